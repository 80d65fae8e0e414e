"""Render every config of a Forgather checkout's projects with fgc, and with Forgather when importable.

    python scripts/forgather_diff.py FORGATHER_CHECKOUT [--under examples] [-v]

For each project (a directory holding ``meta.yaml``, outside ``forgather_workspace/`` folders) the
configs are listed as Forgather lists them: every ``*.yaml`` under ``<searchdir>/<config_prefix>`` of
each search directory, the first directory holding a name winning. Each config is rendered by fgc
(``fgc pp -p PROJECT NAME``); when the checkout's ``src/forgather`` imports (it needs jinja2, pyyaml
and platformdirs, not torch), Forgather's own preprocessor renders it too and the two YAML texts are
compared as YAML node trees (tags, keys, scalar values; not styles, comments or blank lines), with
the clock and the current directory pinned so that both see the same values.

Prints one line per config that differs or fails and a summary table: projects, configs,
rendered by Forgather, rendered by fgc, structurally equal, and loaded by fgc (its YAML read into
fgc's graph: tags, merge keys, definitions; with -v, why each other one is not).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys
from pathlib import Path
from unittest import mock

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgc.errors import FgcError  # noqa: E402
from fgc.frontend import environment as fgc_environment  # noqa: E402
from fgc.frontend.project import load_project  # noqa: E402
from fgc.frontend.loader import load  # noqa: E402
from fgc.frontend.render import render  # noqa: E402

FIXED_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5)


class _FixedDatetime(datetime.datetime):
    """datetime with now()/utcnow() pinned, so that both renderers print the same times."""

    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW

    @classmethod
    def utcnow(cls):
        return FIXED_NOW


def projects(root: Path) -> list[Path]:
    """Every project directory under ROOT, in path order."""
    found = []
    for meta in sorted(root.rglob("meta.yaml")):
        if "forgather_workspace" in meta.parts or any(p.startswith(".") for p in meta.parts):
            continue
        found.append(meta.parent)
    return found


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "0"  # Forgather requires accelerate's version; the same "0" for both renderers


def forgather_renderer(checkout: Path):
    """A function (project_dir, config_name) -> YAML text by Forgather's preprocessor, or None."""
    sys.path.insert(0, str(checkout / "src"))
    try:
        import forgather.config as fconfig
        import forgather.meta_config as fmeta
        import forgather.preprocess as fpp
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"Forgather's preprocessor does not import ({type(exc).__name__}: {exc}); fgc only", file=sys.stderr)
        return None
    fmeta.version = _version
    fpp.datetime = mock.Mock(wraps=datetime, datetime=_FixedDatetime)

    def render_forgather(project_dir: Path, name: str) -> str:
        meta = fmeta.MetaConfig(str(project_dir))
        env = fconfig.ConfigEnvironment(
            searchpath=meta.searchpath,
            global_vars=fmeta.preprocessor_globals(str(project_dir), meta.workspace_root),
        )
        return str(env.preprocess(meta.config_path(name)))

    return render_forgather


def tree(node, memo=None):
    """A YAML node as plain nested tuples: tag and value, recursively; styles and positions dropped.
    A node met again (an alias) is the same tuple; a node inside itself is ("<cycle>",)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = ("<cycle>",)
    if isinstance(node, yaml.ScalarNode):
        out = (node.tag, node.value)
    elif isinstance(node, yaml.SequenceNode):
        out = (node.tag, tuple(tree(n, memo) for n in node.value))
    else:
        out = (node.tag, tuple((tree(k, memo), tree(v, memo)) for k, v in node.value))
    memo[id(node)] = out
    return out


def first_difference(a, b, path="") -> str:
    """Where two trees of :func:`tree` first differ, as ``path: fgc's vs Forgather's``."""
    if a == b:
        return ""
    if len(a) != 2 or len(b) != 2 or a[0] != b[0] or type(a[1]) is not type(b[1]) or isinstance(a[1], str):
        return f"{path or '/'}: {str(a)[:80]} vs {str(b)[:80]}"
    if a[0] == "tag:yaml.org,2002:map" or (a[1] and isinstance(a[1][0], tuple) and len(a[1][0]) == 2 and isinstance(a[1][0][0], tuple) and isinstance(a[1][0][0][0], str) and a[1][0][0][0].startswith("tag:") and isinstance(a[1][0][1], tuple) and len(a[1][0][1]) == 2 and isinstance(a[1][0][0][1], str)):
        keys_a = [k[1] for k, _ in a[1]]
        keys_b = [k[1] for k, _ in b[1]]
        if keys_a != keys_b:
            return f"{path or '/'}: keys {[k for k in keys_a if k not in keys_b][:5]} vs {[k for k in keys_b if k not in keys_a][:5]}"
        for (ka, va), (_, vb) in zip(a[1], b[1]):
            found = first_difference(va, vb, f"{path}/{ka[1]}")
            if found:
                return found
    if len(a[1]) != len(b[1]):
        return f"{path or '/'}: {len(a[1])} vs {len(b[1])} items"
    for i, (x, y) in enumerate(zip(a[1], b[1])):
        found = first_difference(x, y, f"{path}/{i}")
        if found:
            return found
    return f"{path or '/'}: differs"


def compose(text: str):
    return tree(yaml.compose(text, Loader=yaml.SafeLoader))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument(
        "--under", default="examples", help="the folder holding the projects (in the checkout, or any path)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the configs that agree")
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    render_forgather = forgather_renderer(checkout)
    counts = dict(projects=0, configs=0, forgather=0, fgc=0, equal=0, loaded=0)
    os.chdir(checkout)  # both renderers print getcwd() in headers
    fgc_environment._installed_version = _version
    under = (checkout / args.under).resolve()
    for project_dir in projects(under):
        counts["projects"] += 1
        rel = project_dir.relative_to(under.parent)
        try:
            with mock.patch("datetime.datetime", _FixedDatetime):
                project = load_project(project_dir)
        except FgcError as exc:
            print(f"{rel}: project: {exc.diagnostics[0].format()}")
            continue
        for name in project.config_names():
            counts["configs"] += 1
            theirs = mine = None
            if render_forgather is not None:
                try:
                    theirs = render_forgather(project_dir, name)
                    counts["forgather"] += 1
                except Exception as exc:  # noqa: BLE001 - Forgather's failure is a data point
                    theirs = None
                    if args.verbose:
                        print(f"{rel} {name}: forgather: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            try:
                with mock.patch("datetime.datetime", _FixedDatetime):
                    rendered = render(name, project_dir=project_dir)
                mine = rendered.text
                counts["fgc"] += 1
            except FgcError as exc:
                print(f"{rel} {name}: fgc: {exc.diagnostics[0].format().splitlines()[0]}")
                continue
            try:
                load(rendered)
                counts["loaded"] += 1
            except FgcError as exc:
                if args.verbose:
                    print(f"{rel} {name}: fgc load: {exc.diagnostics[0].format().splitlines()[0]}")
            if theirs is None:
                continue
            try:
                expected = compose(theirs)
            except yaml.YAMLError:
                continue  # Forgather's text is no YAML either: nothing to compare
            try:
                ours = compose(mine)
                same = ours == expected
            except yaml.YAMLError as exc:
                print(f"{rel} {name}: fgc's YAML: {str(exc).splitlines()[0]}")
                continue
            counts["equal"] += same
            if not same:
                print(f"{rel} {name}: differs: {first_difference(ours, expected)}")
            elif args.verbose:
                print(f"{rel} {name}: equal")
    print()
    print(f"{'projects':>10} {'configs':>8} {'forgather':>10} {'fgc':>6} {'equal':>6} {'loaded':>7}")
    print(
        f"{counts['projects']:>10} {counts['configs']:>8} "
        f"{counts['forgather'] if render_forgather else '-':>10} {counts['fgc']:>6} "
        f"{counts['equal'] if render_forgather else '-':>6} {counts['loaded']:>7}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
