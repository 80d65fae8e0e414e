"""Inspection: the IR graph in several formats, and `fgc code`'s standalone construction module."""

from __future__ import annotations

import json
from pathlib import Path

import libcst as cst
import yaml

from fgc_lowering.context import LoweringContext
from fgc_lowering.pipeline import CODE_PASSES, lower

from .codegen.package import format_python, import_groups
from .codegen.emit import ImportTable, TargetEmitter, _identifier, literal
from .codegen.escape import python_docstring
from .codegen.vendor import VendorError, vendor_symbols
from .errors import FgcError, Location, display_path
from .frontend.loader import load
from .frontend.render import Rendered, render
from .ir import IRGraph


def load_for_code(
    config, include_dirs=(), variables=None, project_dir=None
) -> tuple[Rendered, IRGraph, LoweringContext]:
    """Render, load and resolve callables, leaving !vars unbound (they become parameters)."""
    rendered = render(config, include_dirs, variables or {}, project_dir)
    ir = load(rendered)
    ctx = LoweringContext(rendered.source.path, rendered.source.search_path, dict(variables or {}))
    ir = lower(ir, ctx, passes=CODE_PASSES)
    return rendered, ir, ctx


def construction_module(ir: IRGraph, ctx: LoweringContext, targets: list[str], config_name: str) -> str:
    """A module defining ``construct(**vars)`` that builds TARGETS as the config says.

    With one target, ``construct`` returns it; with several, a dict of them (objects shared
    between targets stay shared). Component classes are vendored, so the module needs no fgc.
    """
    symbols = [
        ctx.symbols[n] for t in targets for n in ir.reachable(ir.targets[t]) if n in ctx.symbols
    ]
    try:
        vendored = vendor_symbols(symbols, display_path)
    except VendorError as exc:
        raise FgcError(str(exc), ir.node(ir.targets[targets[0]]).loc) from None
    imports = ImportTable(set())
    emitter = TargetEmitter(ir, ctx.symbols, imports, vendored)
    statements, names = emitter.emit_targets(targets)
    params = []
    for var in sorted(emitter.variables):
        default = emitter.variables[var]
        if default is None:
            params.append(cst.Param(cst.Name(_identifier(var))))
            continue
        node = ir.node(default)
        if node.kind not in ("value", "list", "tuple", "dict"):
            raise FgcError(f"fgc code: the default of !var {var!r} must be a plain value", node.loc)
        value = emitter.expression(default, {}, top=True)
        params.append(cst.Param(cst.Name(_identifier(var)), default=value))
    if len(targets) == 1:
        result: cst.BaseExpression = cst.Name(names[targets[0]])
    else:
        result = cst.Dict([cst.DictElement(literal(t), cst.Name(names[t])) for t in targets])
    body = statements + [cst.SimpleStatementLine([cst.Return(result)])]
    func = cst.FunctionDef(
        name=cst.Name("construct"),
        params=cst.Parameters(kwonly_params=params, star_arg=cst.ParamStar() if params else cst.MaybeSentinel.DEFAULT),
        body=cst.IndentedBlock(body),
    )
    what = f"target {targets[0]!r}" if len(targets) == 1 else "targets " + ", ".join(map(repr, targets))
    doc = f'"""Construct {python_docstring(what)} of {python_docstring(config_name)}, as fgc reads the config."""\n\n'
    groups = import_groups(list(vendored.imports) + imports.statements())
    parts = [doc, "\n\n".join("\n".join(g) for g in groups), "\n\n"]
    for _, _, source in vendored.definitions:
        parts.append(source + "\n\n\n")
    parts.append(cst.Module([func]).code)
    return format_python("".join(parts))


def graph_data(ir: IRGraph) -> dict:
    return ir.to_data()


def graph_text(ir: IRGraph, fmt: str) -> str:
    """The IR graph as yaml, json or dot."""
    data = graph_data(ir)
    if fmt == "json":
        return json.dumps(data, indent=2, default=repr) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(json.loads(json.dumps(data, default=repr)), sort_keys=False)
    if fmt == "dot":
        lines = ["digraph fgc {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
        for nid, item in data["nodes"].items():
            if item["kind"] == "call":
                label = f"{nid}\n!{item['mode']}:{item['spec']}"
            elif item["kind"] == "value":
                label = f"{nid} = {item['value']!r}"
            elif item["kind"] == "var":
                label = f"{nid}\n!var {item['var']}"
            else:
                label = f"{nid}\n{item['kind']}"
            lines.append(f"  {json.dumps(nid)} [label={json.dumps(label)}];")
        for parent, child, slot in sorted(ir.g.edges(keys=True)):
            lines.append(f"  {json.dumps(parent)} -> {json.dumps(child)} [label={json.dumps(slot)}];")
        lines.append("}")
        return "\n".join(lines) + "\n"
    raise ValueError(fmt)


def template_tree(rendered: Rendered, fmt: str = "text") -> str:
    """The extends/include tree of the templates a render loaded, as text or dot."""
    loader = rendered.loader

    def name_of(tf) -> str:
        # as errors name files (fgc/templates/lm/train.yaml from the repository); <fgc>/ is for
        # what a package records, where the path must not depend on the machine
        shown = display_path(str(tf.path))
        return f"{shown}#{tf.inline_name}" if tf.inline_name else shown

    def child_of(ref):
        found = loader.inline.get(ref.name)
        if found is None:
            path = loader.find(ref.name)
            found = loader.by_key.get(str(path)) if path is not None else None
        return found

    if fmt == "dot":
        lines = ["digraph templates {", "  node [shape=box, fontname=monospace];"]
        seen: set[str] = set()

        def walk_dot(tf) -> None:
            if tf.key in seen:
                return
            seen.add(tf.key)
            lines.append(f"  {json.dumps(name_of(tf))};")
            for ref in loader.references_of(tf):
                child = child_of(ref)
                if child is None:
                    continue
                label = f"{ref.kind} (line {tf.file_line(ref.line)})"
                edge = f"{json.dumps(name_of(tf))} -> {json.dumps(name_of(child))}"
                lines.append(f"  {edge} [label={json.dumps(label)}];")
                walk_dot(child)

        walk_dot(rendered.root)
        lines.append("}")
        return "\n".join(lines) + "\n"

    out = [name_of(rendered.root)]
    shown: set[str] = {rendered.root.key}

    def walk(tf, depth: int) -> None:
        for ref in loader.references_of(tf):
            child = child_of(ref)
            if child is None:
                continue
            again = child.key in shown
            out.append(
                f"{'    ' * depth}{ref.kind} {ref.name!r} (line {tf.file_line(ref.line)}): "
                f"{name_of(child)}{' (shown above)' if again else ''}"
            )
            if not again:
                shown.add(child.key)
                walk(child, depth + 1)

    walk(rendered.root, 1)
    return "\n".join(out) + "\n"


def list_configs(directory, include_dirs=(), project=None) -> list[tuple[str, str | None]]:
    """(config, what to say about it, whether it is fine) for every config under DIRECTORY
    (default: the project around the working directory, else that directory), or of the project
    PROJECT: said is None for a config that checks, ``OK (needs -D NAME=...)`` for one that only
    lacks a required knob (a fine-tune's model_dir), else its first error. A project's configs are
    the names Forgather finds (``<searchdir>/<config_prefix>/NAME``), each rendered in the project."""
    from .build import check_config, is_fgc_build
    from .frontend.project import META, WORKSPACE, find_project_dir, load_project

    if project is not None:
        directory = Path(project)
        if not (directory / META).is_file():
            raise FgcError(f"not a project: no {META}", Location(str(directory)))
    if directory is None:
        # the project around the working directory; outside any project, the working directory
        directory = find_project_dir(Path.cwd()) or Path(".")
    directory = Path(directory)
    if not directory.is_dir():
        raise FgcError("no such directory", Location(str(directory)))
    def project_configs(folder: Path) -> list[tuple]:
        loaded = load_project(folder)
        return [(name, loaded.config_path(name), loaded.dir) for name in loaded.config_names()]

    if (directory / META).is_file():
        configs = project_configs(directory)
    else:
        builds: dict[Path, bool] = {}

        def in_build(path: Path) -> bool:
            # a package fgc built (its config.yaml is generated, not a config to list)
            for parent in path.relative_to(directory).parents:
                folder = directory / parent
                if folder not in builds:
                    builds[folder] = is_fgc_build(folder)
                if builds[folder]:
                    return True
            return False

        def hidden(p: Path) -> bool:
            return any(part.startswith(".") for part in p.relative_to(directory).parts)

        # a project below DIRECTORY lists its configs as the project finds them (not its templates)
        projects = [m.parent for m in sorted(directory.rglob(META)) if not hidden(m) and not in_build(m)]
        # a workspace (a folder with forgather_workspace/) holds configs only in its projects:
        # the rest of it is meta templates and template libraries
        workspace = (directory / WORKSPACE).is_dir()
        configs = [
            (p, p, None)
            for p in sorted(directory.rglob("*.yaml"))
            if p.name != META
            and not workspace
            and not hidden(p)
            and not in_build(p)
            and WORKSPACE not in p.relative_to(directory).parts
            and not any(project in p.parents for project in projects)
        ]
        for project in projects:
            configs += project_configs(project)
        configs.sort(key=lambda c: str(c[1].resolve()))
    results = []
    for config, path, project_dir in configs:
        try:
            rendered, ir, _ = load_for_code(config, include_dirs, project_dir=project_dir)
            if {"model", "optimizer", "trainer"} <= set(ir.targets):
                # a training config: everything build checks
                check_config(config, include_dirs, project_dir=project_dir)
            error = None
            ok = True
        except FgcError as exc:
            needs = getattr(exc, "required_knob", None)
            # a fine-tune without its model directory: fine, it only needs the -D
            error = f"OK (needs -D {needs})" if needs else exc.diagnostics[0].format().splitlines()[0]
            ok = needs is not None
        results.append((display_path(str(path.resolve())), error, ok))
    return results
