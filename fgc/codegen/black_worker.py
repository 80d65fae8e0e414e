"""black in a second process, started when a build starts, so that black's import (about a tenth
of a second) runs beside the build's own work (torch's import above all) on another core.

:func:`start` launches it with the build's interpreter, environment and module search path
(``sys.path``, set before the worker imports anything: never the current directory that
``python -m`` or ``-c`` would put first, where a user's ``black.py`` would then run, unless the
build's own path has it). It imports black, then formats each source sent to it, one at a
time, over its standard input and output (a request: the source's length in 4 bytes, then its
UTF-8 bytes; an answer: one status byte, then the same for black's output or the error's text).
:func:`fgc.codegen.package.format_python` asks it first when one is running; an error of any kind
(black refuses the source, the worker is gone, its black is another version) makes it format in
its own process instead, where black raises as it always did, so a build's output and errors
are the same with or without a worker.

Only the ``fgc`` console script starts one (:func:`fgc.cli.run`), on a machine with two or more
cores for the process: in-process callers (the tests' CLI runner) format in their own process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import struct
import subprocess
import sys

_LENGTH = struct.Struct(">I")
OK, ERROR = b"\x00", b"\x01"


@functools.lru_cache(maxsize=1)
def black_version() -> str:
    """The installed black's version (what a worker's black must be; part of the cache's keys)."""
    return importlib.metadata.version("black")


def mode(black):
    """The one black style of generated code: black's defaults for Python 3.10 and later (a
    fixed target, so that a piece formats the same alone as in its file)."""
    return black.Mode(target_versions={black.TargetVersion.PY310})


class Worker:
    """A running worker process: :meth:`format` sends it a source and returns black's output, or
    None when it cannot (the caller formats in-process)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.checked = False

    def format(self, source: str) -> str | None:
        if self.proc is None:
            return None
        try:
            if not self.checked:  # the worker says which black it imported, once
                self.checked = True
                if _read(self.proc.stdout)[1] != black_version():  # the worker's, ours
                    self.close()
                    return None
            _write(self.proc.stdin, source.encode("utf-8"))
            status, text = _read(self.proc.stdout)
        except (OSError, EOFError, ValueError):
            self.close()
            return None
        return text if status == OK else None

    def close(self) -> None:
        """Stop the worker (it may still be importing black: a build that failed early) and
        collect its exit, so that no process is left behind."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


_current: Worker | None = None


def current() -> Worker | None:
    """The worker of the running build, if it has one."""
    return _current


@contextlib.contextmanager
def running():
    """Within: a worker formats for :func:`fgc.codegen.package.format_python` (if one starts);
    after: it is stopped."""
    global _current
    worker = _current = start()
    try:
        yield worker
    finally:
        _current = None
        if worker is not None:
            worker.close()


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The worker's program: this process's module search path first (os and sys are imported before
# any code runs, so nothing is looked up on the path `-c` starts with), then serve().
_PATH_VAR = "FGC_BLACK_WORKER_PATH"
_BOOT = (
    f"import os, sys; sys.path[:] = os.environ.pop({_PATH_VAR!r}).split(os.pathsep); "
    f"from {__name__} import serve; serve()"
)


def start() -> Worker | None:
    """A worker (None: fewer than two cores, or it cannot start)."""
    if _cores() < 2:
        return None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, **{_PATH_VAR: os.pathsep.join(sys.path)}),
        )
    except OSError:
        return None
    return Worker(proc)


def _write(stream, data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream) -> tuple[bytes, str]:
    """One answer: (status, text)."""
    status = stream.read(1)
    head = stream.read(_LENGTH.size)
    if len(status) != 1 or len(head) != _LENGTH.size:
        raise EOFError("the black worker ended")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the black worker ended")
    return status, data.decode("utf-8")


def serve(stdin=None, stdout=None) -> None:
    """The worker: import black, say its version, then answer each request until the input ends."""
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    import black

    style = mode(black)
    _answer(stdout, OK, black_version())
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) != _LENGTH.size:
            return
        (size,) = _LENGTH.unpack(head)
        source = stdin.read(size).decode("utf-8")
        try:
            status, answer = OK, black.format_str(source, mode=style)
        except Exception as exc:  # the caller formats in-process and raises there
            status, answer = ERROR, f"{type(exc).__name__}: {exc}"
        _answer(stdout, status, answer)


def _answer(stream, status: bytes, text: str) -> None:
    stream.write(status)
    _write(stream, text.encode("utf-8"))


if __name__ == "__main__":
    serve()
