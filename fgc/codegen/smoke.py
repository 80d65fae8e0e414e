"""Build-time smoke check: every generated file compiles and the model builds on the meta device."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from fgc.errors import FgcError, Location


def smoke_check(package_dir: Path) -> None:
    """Compile every ``.py`` file of the package and run ``build_model(device="meta")``."""
    for path in sorted(package_dir.rglob("*.py")):
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        except SyntaxError as exc:  # a bug in fgc, not in the config
            raise RuntimeError(f"generated file {path.name} does not compile: {exc}") from exc
    saved = list(sys.path)
    sys.path.insert(0, str(package_dir))
    try:
        namespace = runpy.run_path(str(package_dir / "model.py"), run_name="fgc_smoke_model")
        try:
            namespace["build_model"](device="meta")
        except Exception as exc:  # the config's arguments do not build a model
            raise FgcError(
                f"the model does not build: {type(exc).__name__}: {exc}",
                Location(str(package_dir / "model.py")),
                hint="check the model's arguments in the config; --no-smoke skips this check",
            ) from None
    finally:
        sys.path[:] = saved
