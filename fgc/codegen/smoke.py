"""Build-time smoke check: every generated file compiles and the model builds on the meta device."""

from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path

from fgc.errors import FgcError, Location


def smoke_check(package_dir: Path, where: Location, callables: dict[str, Location] | None = None) -> None:
    """Compile every ``.py`` file of the package and run ``build_model(device="meta")``.

    A file of ``fgc_runtime/`` identical to the runtime module it was copied from is not compiled
    again: it is fgc's own code (its tests import every module), and the model imports the ones
    it runs.

    A model that does not build is the config's mistake: it is reported at the config line of the
    innermost callable that raised (from ``callables``: class or function name → config location),
    else at WHERE (the model target).
    """
    from .package import RUNTIME_DIR

    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        text = path.read_text(encoding="utf-8")
        if rel.parts[0] == "fgc_runtime" and _copy_of(RUNTIME_DIR.joinpath(*rel.parts[1:]), text):
            continue
        try:
            compile(text, str(path), "exec")
        except SyntaxError as exc:  # a bug in fgc, not in the config
            raise RuntimeError(f"generated file {path.name} does not compile: {exc}") from exc
    saved = list(sys.path)
    sys.path.insert(0, str(package_dir))
    try:
        namespace = runpy.run_path(str(package_dir / "model.py"), run_name="fgc_smoke_model")
        try:
            with skip_init():
                namespace["build_model"](device="meta")
        except Exception as exc:  # the config's arguments do not build a model
            raise FgcError(
                f"the model does not build: {type(exc).__name__}: {exc}",
                _culprit(exc, callables or {}) or where,
                hint="check the model's arguments in the config; `fgc build --no-smoke` skips this check",
            ) from None
    finally:
        sys.path[:] = saved


def _copy_of(source: Path, text: str) -> bool:
    """Whether TEXT is the text of the file SOURCE."""
    try:
        return source.read_text(encoding="utf-8") == text
    except OSError:
        return False


@contextlib.contextmanager
def skip_init():
    """No weight initialisation while building on the meta device: there are no values to set,
    and torch's meta implementations of the init functions import torch._dynamo (over a second)."""
    import torch

    saved = {}
    for name in dir(torch.nn.init):
        fn = getattr(torch.nn.init, name)
        if name.endswith("_") and not name.startswith("_") and callable(fn):
            saved[name] = fn
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _culprit(exc: BaseException, callables: dict[str, Location]) -> Location | None:
    """The config location of the innermost constructor or function on the traceback that the
    config names."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        for name in (type(owner).__name__ if owner is not None else None, frame.f_code.co_name):
            if name in callables:
                found = callables[name]
        tb = tb.tb_next
    return found
