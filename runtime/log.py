"""Console output of a trainer: INFO from rank 0 only, warnings and errors from any rank with its
rank in front, and a progress bar when stdout is a terminal.

    [rank 1] warning: the validation split is empty

When stdout is not a terminal (a log file, a pipe, CI) there is no bar: only the plain lines of
:meth:`RankLog.info`, so logs stay greppable.
"""

from __future__ import annotations

import sys


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h03m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def render_bar(step: int, total: int, width: int = 24, suffix: str = "") -> str:
    """One line of progress: ``  37/100 [########----------------]  37% | SUFFIX``.

    ``width`` is the number of cells between the brackets; a cell fills once its share of
    ``total`` is done, so the bar is full only at ``step == total``.
    """
    total = max(total, 1)
    step = min(max(step, 0), total)
    filled = width * step // total
    digits = len(str(total))
    line = f"{step:>{digits}}/{total} [{'#' * filled}{'-' * (width - filled)}] {100 * step // total:>3}%"
    return f"{line} | {suffix}" if suffix else line


class ProgressBar:
    """A bar redrawn in place on ``stream`` (``\\r``, then the line, then clear to the end)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.width = width
        self._shown = False

    def update(self, step: int, suffix: str = "") -> None:
        """Draw the bar at ``step``."""
        self.stream.write("\r" + render_bar(step, self.total, self.width, suffix) + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar's line (before a plain line is printed)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False

    def close(self) -> None:
        """Leave the last bar on screen and move to the next line."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class RankLog:
    """Where a trainer's messages go.

    ``info`` prints on rank 0 only; ``warning`` and ``error`` print on any rank, to stderr, as
    ``[rank R] warning: ...``. With ``progress_total`` and rank 0's stdout a terminal,
    :meth:`progress` draws a bar under the info lines, followed by the text of :meth:`status`;
    otherwise it does nothing.
    """

    def __init__(self, rank: int = 0, progress_total: int | None = None, stdout=None, stderr=None):
        self.rank = rank
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        tty = getattr(self.stdout, "isatty", lambda: False)()
        self.bar = ProgressBar(progress_total, self.stdout) if progress_total and rank == 0 and tty else None
        self._last_step = None
        self._suffix = ""

    def info(self, message: str) -> None:
        """Print ``message`` on rank 0 (above the bar, if there is one)."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.clear()
        print(message, file=self.stdout, flush=True)
        if self.bar is not None and self._last_step is not None:
            self.bar.update(self._last_step, self._suffix)

    def warning(self, message: str) -> None:
        """``[rank R] warning: MESSAGE`` on stderr, from any rank."""
        self._err("warning", message)

    def error(self, message: str) -> None:
        """``[rank R] error: MESSAGE`` on stderr, from any rank."""
        self._err("error", message)

    def _err(self, kind: str, message: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(f"[rank {self.rank}] {kind}: {message}", file=self.stderr, flush=True)

    def status(self, text: str) -> None:
        """The text the bar shows after itself from now on (e.g. the last loss and the ETA)."""
        self._suffix = text

    def progress(self, step: int) -> None:
        """Redraw the bar at ``step`` (on a terminal; otherwise nothing)."""
        if self.bar is None:
            return
        self._last_step = step
        self.bar.update(step, self._suffix)

    def close(self) -> None:
        """End the bar's line."""
        if self.bar is not None:
            self.bar.close()


def _plan_rows(value, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict) and value and key != "mesh":
        if set(value) == {"impl", "reason"}:  # a kernel choice: the implementation and why
            return [(key, f"{value['impl']} ({value['reason']})")]
        rows = []
        for name, item in value.items():
            rows += _plan_rows(item, f"{key}.{name}" if key else str(name))
        return rows
    if key == "mesh" and isinstance(value, dict) and value:
        return [(key, " x ".join(f"{name} {size}" for name, size in value.items()))]
    if value is None or value == [] or value == {}:
        return [(key, "none")]
    if isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
        # e.g. the pipeline's stages: one row each
        return [(f"{key}[{i}]", ", ".join(f"{k} {v}" for k, v in item.items())) for i, item in enumerate(value)]
    if isinstance(value, (list, tuple)):
        return [(key, ", ".join(str(v) for v in value))]
    return [(key, str(value))]


def format_plan(plan: dict) -> str:
    """The plan a package was built with, one setting a line (nested ones by dotted name):
    ``  mesh                dp 2 x tp 2``."""
    rows = _plan_rows(plan)
    width = max(len(name) for name, _ in rows)
    return "plan:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)
