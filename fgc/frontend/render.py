"""Rendering: a config file → YAML text, through sandboxed strict Jinja2 over a search path.

Every template is preprocessed (:mod:`fgc.frontend.preprocess`) as it loads
(:mod:`fgc.frontend.templates`); origin markers map each line of the output back to the template
line it came from, and every error Jinja2 raises is mapped back to the file and line the user wrote.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.meta

from ..errors import Diagnostic, FgcError, Location, display_path
from .environment import TemplateRaise, host_globals, make_environment, toyaml  # noqa: F401
from .preprocess import strip_markers
from .project import ConfigSource, resolve_config
from .templates import LIBRARY_DIR, FgcLoader, TemplateFile  # noqa: F401

_NS_REF_RE = re.compile(r"\{\{[^}]*?\bns\.(\w+)")
_VERBS = {"extends": "extends", "include": "includes", "import": "imports", "from": "imports from"}


@dataclass
class Rendered:
    """The output of rendering: YAML text plus the origin of every line."""

    text: str
    origins: list[tuple[int, int] | None]
    loader: FgcLoader
    root: TemplateFile
    source: ConfigSource | None = None
    warnings: list[Diagnostic] = field(default_factory=list)
    nonreproducible: dict[str, str] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)  # every variable name a template reads
    ns_history: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # ns.NAME -> sets
    variables: dict = field(default_factory=dict)  # -D NAME=VALUE

    def origins_of(self, loc: Location) -> list[tuple[Location, str | None]]:
        """Where a value written at LOC really came from, oldest first: for a line that prints one
        ``ns.NAME``, every ``-- set ns.NAME`` that ran (with the ``-D NAME=VALUE`` it read, if
        any), then LOC itself."""
        tf = next(
            (f for f in self.files.values() if str(f.path) == loc.file and loc.line is not None
             and f.line_offset < loc.line <= f.line_offset + f.text.count("\n") + 1),
            None,
        )
        out: list[tuple[Location, str | None]] = []
        if tf is not None:
            text = tf.text.split("\n")[loc.line - tf.line_offset - 1]
            names = set(_NS_REF_RE.findall(text))
            if len(names) == 1:
                name = names.pop()
                for key, line in self.ns_history.get(name, []):
                    setter_tf = self.loader.by_key.get(key)
                    setter = setter_tf.text.split("\n")[line - 1] if setter_tf else ""
                    read = [
                        f"-D {var}={self.variables[var]!r}"
                        for var in sorted(self.variables)
                        if re.search(rf"(?<![\w.]){re.escape(var)}(?!\w)", setter.split("=", 1)[-1])
                    ]
                    out.append((self.loader.location(key, line), ", ".join(read) or None))
        out.append((loc, None))
        return out

    @property
    def files(self) -> dict[int, TemplateFile]:
        return self.loader.files

    def location(self, rendered_line: int, col: int | None = None) -> Location:
        """The template location of a 0-based line of the rendered text."""
        origin = self.origins[rendered_line] if 0 <= rendered_line < len(self.origins) else None
        if origin is None:
            return Location(str(self.root.path))
        return self.file_location(origin[0], origin[1], col)

    def file_location(self, file_id: int, line: int, col: int | None = None) -> Location:
        return self.loader.location(self.files[file_id].key, line, col)

    def chain_of_templates(self) -> list[str]:
        """The display names of every template loaded, in load order."""
        return [f.display for f in sorted(self.files.values(), key=lambda f: f.file_id)]


_STATEMENT_RE = re.compile(r"\{%-?\s*(\w+)([^%]*)")
_OPENERS = {"if", "for", "block", "macro", "call", "filter", "with", "raw"}


def _unclosed_statement(source: str) -> tuple[str, int] | None:
    """The innermost block statement (``if``, ``for``, ``block``, ...) that is never closed."""
    stack: list[tuple[str, int]] = []
    for lineno, line in enumerate(source.split("\n"), start=1):
        for m in _STATEMENT_RE.finditer(line):
            word, rest = m.group(1), m.group(2)
            if word in _OPENERS or (word == "set" and "=" not in rest):
                stack.append((word, lineno))
            elif word.startswith("end") and stack:
                stack.pop()
    return stack[-1] if stack else None


def _template_frame(exc: BaseException, loader: FgcLoader) -> tuple[str, int] | None:
    """The innermost traceback frame that is a template line: (template key, line)."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in loader.by_key:
            found = (frame.filename, frame.lineno)
    return found


def _error_location(exc: BaseException, loader: FgcLoader, root: TemplateFile) -> Location:
    frame = _template_frame(exc, loader)
    return loader.location(*frame) if frame else Location(str(root.path))


def block_warnings(loader: FgcLoader) -> list[Diagnostic]:
    """A warning for each top-level block of a child template that no parent defines."""
    warnings = []
    for tf in sorted(loader.files.values(), key=lambda f: f.file_id):
        parent = loader.parent_of(tf)
        if parent is None:
            continue
        inherited: set[str] = set()
        seen: set[str] = set()
        while parent is not None and parent.key not in seen:
            seen.add(parent.key)
            inherited.update(name for name, _, _ in parent.blocks)
            parent = loader.parent_of(parent)
        for name, line, depth in tf.blocks:
            if depth == 0 and name not in inherited:
                warnings.append(
                    Diagnostic(
                        f"block {name!r} is not defined by the template this one extends; "
                        "its content is ignored",
                        loader.location(tf.key, line),
                        hint="check the block name for a typo",
                        severity="warning",
                    )
                )
    return warnings


def render_file(
    path: Path,
    search_path: list[Path],
    context: dict,
    source: ConfigSource | None = None,
    variables: dict | None = None,
) -> Rendered:
    """Render the template file PATH with CONTEXT over SEARCH_PATH; errors point into the user's files."""
    path = Path(path).resolve()
    loader = FgcLoader(search_path)
    nonrepro: dict[str, str] = {}
    ns_history: dict[str, list[tuple[str, int]]] = {}
    env = make_environment(loader, nonrepro, ns_history)
    root = loader.load_file(path.name, path)
    context = {**host_globals(nonrepro), **context}
    try:
        text = env.get_template(root.key).render(context)
    except FgcError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        key = exc.filename if exc.filename in loader.by_key else root.key
        hint = None
        opened = _unclosed_statement(loader.by_key[key].source) if key in loader.by_key else None
        if opened and "Unexpected end of template" in str(exc.message):
            where = loader.location(key, opened[1])
            hint = f"the '{opened[0]}' opened at {display_path(where.file)}:{where.line} is never closed"
        raise FgcError(f"template syntax: {exc.message}", loader.location(key, exc.lineno), hint) from None
    except jinja2.TemplateNotFound as exc:
        raise FgcError(
            f"template not found: {exc.name!r}",
            _error_location(exc, loader, root),
            hint="searched: " + ", ".join(str(p) for p in loader.search_path),
        ) from None
    except RecursionError:
        cycle = loader.find_cycle(root)
        if not cycle:
            raise FgcError(
                "extends/include cycle: the templates include or extend each other without end",
                Location(str(path)),
            ) from None
        steps = ", ".join(
            f"{display_path(str(tf.path))}:{tf.file_line(ref.line)} "
            f"{_VERBS.get(ref.kind, ref.kind)} {ref.name!r}"
            for tf, ref in cycle
        )
        first, ref = cycle[0]
        raise FgcError(f"extends/include cycle: {steps}", loader.location(first.key, ref.line)) from None
    except (TemplateRaise, jinja2.TemplateError, jinja2.exceptions.SecurityError) as exc:
        message = str(exc) if isinstance(exc, TemplateRaise) else f"template: {exc}"
        if isinstance(exc, jinja2.UndefinedError):
            message = f"undefined: {exc.message}"
        raise FgcError(message, _error_location(exc, loader, root)) from None
    except Exception as exc:  # e.g. a TypeError of an expression: the template's mistake
        frame = _template_frame(exc, loader)
        if frame is None:
            raise
        message = f"template: {type(exc).__name__}: {exc}"
        raise FgcError(message, loader.location(*frame)) from None
    text, origins = strip_markers(text)
    rendered = Rendered(
        text, origins, loader, root, source, nonreproducible=nonrepro, ns_history=ns_history,
        variables=dict(variables or {}),
    )
    for tf in loader.files.values():
        rendered.referenced |= jinja2.meta.find_undeclared_variables(env.parse(tf.source))
    rendered.warnings.extend(block_warnings(loader))
    for key in sorted(nonrepro):
        rendered.warnings.append(
            Diagnostic(
                f"the build is not reproducible: the config uses {key} = {nonrepro[key]!r}",
                Location(str(path)),
                severity="warning",
            )
        )
    return rendered


def search_path_for(config: Path, include_dirs=(), project_dir=None) -> list[Path]:
    """The template search path of a config file."""
    return resolve_config(config, include_dirs, project_dir).search_path


def render(
    config: str | Path | None,
    include_dirs: list[str] | tuple[str, ...] = (),
    variables: dict | None = None,
    project_dir: str | Path | None = None,
) -> Rendered:
    """Preprocess and render CONFIG to YAML text, mapping every error to the user's file:line."""
    source = resolve_config(config, include_dirs, project_dir)
    context = {"config_dir": str(source.path.parent), **source.globals(), **(variables or {})}
    return render_file(source.path, source.search_path, context, source, variables)
