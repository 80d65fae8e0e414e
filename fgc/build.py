"""The compiler driver: config → rendered YAML → IR → lowered IR → package on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fgc_lowering.context import LoweringContext
from fgc_lowering.pipeline import lower

from .errors import Diagnostic, FgcError, Location, display_path
from .frontend.loader import load
from .frontend.render import Rendered, render
from .ir import IRGraph


@dataclass
class Compiled:
    rendered: Rendered
    ir: IRGraph
    ctx: LoweringContext

    @property
    def warnings(self) -> list[Diagnostic]:
        return self.rendered.warnings + self.ctx.sink.warnings


def compile_config(
    config: str | Path,
    include_dirs: tuple[str, ...] = (),
    variables: dict | None = None,
    dump_after: str | None = None,
    dump: Callable[[str], None] = print,
    project_dir: str | Path | None = None,
) -> Compiled:
    """Render, load and lower CONFIG; raises FgcError with every diagnostic found."""
    variables = dict(variables or {})
    rendered = render(config, include_dirs, variables, project_dir)
    ir = load(rendered)
    ctx = LoweringContext(rendered.source.path, rendered.source.search_path, variables)
    ctx.template_names = rendered.referenced
    try:
        ir = lower(ir, ctx, dump_after=dump_after, dump=dump)
    except FgcError as exc:
        raise FgcError(diagnostics=[with_origin(d, rendered) for d in exc.diagnostics]) from None
    return Compiled(rendered, ir, ctx)


def with_origin(diagnostic: Diagnostic, rendered: Rendered) -> Diagnostic:
    """Add where a knob printed at the error's line was set (a child's line, or a -D) as a hint."""
    if diagnostic.loc is None or diagnostic.loc.line is None:
        return diagnostic
    origins = rendered.origins_of(diagnostic.loc)[:-1]
    if not origins:
        return diagnostic
    loc, dvar = origins[-1]  # the assignment that won
    where = f"{display_path(loc.file)}:{loc.line}"
    note = f"the value was set by {dvar} at {where}" if dvar else f"the value was set at {where}"
    hint = f"{diagnostic.hint}; {note}" if diagnostic.hint else note
    return dataclasses.replace(diagnostic, hint=hint)


def is_fgc_build(path: Path) -> bool:
    """Whether DIR holds an earlier fgc build (its manifest says so)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "fgc-build"


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty directory that is not an fgc build, unless forced."""
    if out.exists() and not out.is_dir():
        raise FgcError("the output path exists and is not a directory", Location(str(out)))
    if out.is_dir() and any(out.iterdir()) and not is_fgc_build(out) and not force:
        raise FgcError(
            "the output directory is not empty and holds no fgc build",
            Location(str(out)),
            hint="choose another directory, or pass --force to replace it",
        )


def build_package(compiled: Compiled, out: Path, force: bool = False, smoke: bool = True) -> None:
    """Generate the package and swap it into OUT atomically: on any error OUT is untouched."""
    from .codegen.package import PackageBuilder
    from .codegen.smoke import smoke_check

    out = Path(out)
    check_output_dir(out, force)
    package = PackageBuilder(compiled.rendered, compiled.ir, compiled.ctx).build()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a build directory is not
    try:
        package.write(tmp)
        if smoke:
            ir, symbols = compiled.ir, compiled.ctx.symbols
            model_nodes = ir.reachable(ir.targets["model"])
            callables = {
                symbols[n].qualname.split(".")[-1]: ir.node(n).loc for n in model_nodes if n in symbols
            }
            smoke_check(tmp, ir.node(ir.targets["model"]).loc, callables)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_config(config, include_dirs=(), variables=None, project_dir=None) -> Compiled:
    """Everything `fgc build` checks, smoke check included, writing nothing that stays."""
    compiled = compile_config(config, include_dirs, variables, project_dir=project_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_package(compiled, Path(tmp) / "package")
    return compiled
