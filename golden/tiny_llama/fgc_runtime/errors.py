"""User-facing errors of a generated trainer, printed as one line and exit status 2."""

from __future__ import annotations

import os
import sys


class RunError(Exception):
    """A user error of the trainer (bad data dir, bad flag, bad checkpoint path).

    ``str(err)`` is ``"PATH: error: MESSAGE"`` when a path is given, else ``"error: MESSAGE"``.
    A ``quiet`` error exits with status 2 without a line: another rank prints the reason.
    """

    def __init__(self, message: str, path=None, quiet: bool = False):
        self.message = message
        self.path = None if path is None else str(path)
        self.quiet = quiet
        super().__init__(message)

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.path}: error: {self.message}"
        return f"error: {self.message}"


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; a :class:`RunError` is printed to stderr and exits with status 2.

    A Ctrl-C that reaches Python as KeyboardInterrupt (before the trainer's own SIGINT handler is
    installed, or in a command that has none, such as ``--export-hf``) is one line and exit
    status 130. Other exceptions propagate: they are bugs, and their traceback is wanted.
    Whatever happens, the process group (if any) is torn down, so no rank leaves its peers
    waiting at exit.
    """
    failed = True
    try:
        main(argv)
        failed = False
    except RunError as err:
        if not err.quiet:
            print(str(err), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: exiting", file=sys.stderr)
        sys.exit(130)
    finally:
        _close_process_group(failed)


def _close_process_group(failed: bool) -> None:
    # imported here: errors is imported by every other runtime module, and needs torch only now
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and abort is not None and dist.get_backend() == "nccl":
        # destroying an nccl group whose peers are gone can block; aborting it cannot
        abort()
    else:
        dist.destroy_process_group()
