"""Diagnostics: user errors reported as ``FILE:LINE[:COL]: error: MESSAGE`` (exit status 2).

Every user mistake is raised as :class:`FgcError` carrying one or more :class:`Diagnostic`s.
The CLI prints them and exits 2; anything else that escapes is a bug (exit 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A place in a file the user wrote; ``chain`` lists the (file, line) it was included or
    extended from, innermost first."""

    file: str
    line: int | None = None
    col: int | None = None
    chain: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        text = display_path(self.file)
        if self.line is not None:
            text += f":{self.line}"
            if self.col is not None:
                text += f":{self.col}"
        return text


def display_path(path: str) -> str:
    """A path as shown to the user: relative to the working directory when under it."""
    if not os.path.isabs(path):
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


@dataclass(frozen=True)
class Diagnostic:
    message: str
    loc: Location | None = None
    hint: str | None = None
    severity: str = "error"  # "error" or "warning"

    def format(self) -> str:
        head = f"{self.loc}: " if self.loc is not None else "fgc: "
        lines = [f"{head}{self.severity}: {self.message}"]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        if self.loc is not None:
            # one line per template in the chain, naming where it was reached from
            here = str(Location(self.loc.file, self.loc.line))
            for file, line in self.loc.chain:
                there = f"{display_path(file)}:{line}"
                lines.append(f"  in {here}, included or extended from {there}")
                here = there
        return "\n".join(lines)


class FgcError(Exception):
    """A user error (exit status 2). Holds every independent diagnostic found."""

    def __init__(
        self,
        message: str | None = None,
        loc: Location | None = None,
        hint: str | None = None,
        diagnostics: list[Diagnostic] | None = None,
    ):
        self.diagnostics: list[Diagnostic] = list(diagnostics or [])
        if message is not None:
            self.diagnostics.insert(0, Diagnostic(message, loc, hint))
        super().__init__("\n".join(d.format() for d in self.diagnostics))


class DiagnosticSink:
    """Collects independent errors so that one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []

    def error(self, message: str, loc: Location | None = None, hint: str | None = None) -> None:
        self.errors.append(Diagnostic(message, loc, hint))

    def warning(self, message: str, loc: Location | None = None, hint: str | None = None) -> None:
        self.warnings.append(Diagnostic(message, loc, hint, severity="warning"))

    def extend(self, exc: FgcError) -> None:
        self.errors.extend(exc.diagnostics)

    def raise_if_errors(self) -> None:
        """Raise every error collected, in reading order."""
        if self.errors:
            raise FgcError(diagnostics=sorted(self.errors, key=reading_order))


def reading_order(d: Diagnostic) -> tuple:
    """Errors in the order of the files and lines the user reads; those without a place first."""
    if d.loc is None:
        return (0, "", 0)
    return (1, d.loc.file, d.loc.line or 0)
