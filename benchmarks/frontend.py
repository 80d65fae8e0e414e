"""Benchmark: fgc's frontend (preprocess + render + load into the IR) against PyYAML.

Generates a config of N nodes spread over a 5-level extends chain, then times, in this process:
  - fgc frontend: render (preprocess, Jinja2, marker stripping) + load (YAML compose -> IR graph)
  - baseline: yaml.load(rendered text, Loader=BaselineLoader) -- PyYAML's pure-Python loader
Goal: fgc at most 2x the baseline, growing linearly with N.

    python benchmarks/frontend.py [--sizes 1000 5000 10000] [--repeat 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _table import print_table

import yaml

from fgc.frontend.loader import load
from fgc.frontend.render import render

LEVELS = 5


class BaselineLoader(yaml.SafeLoader):
    """PyYAML's pure-Python SafeLoader, taking any tag as plain data (as a tag-aware loader must)."""


def _construct_tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


BaselineLoader.add_multi_constructor("!", _construct_tagged)


def write_chain(root: Path, nodes: int) -> Path:
    """Five templates; each level adds a block of targets; ~`nodes` IR nodes in total."""
    per_level = nodes // LEVELS
    # each target: a call with 3 scalar kwargs and a 2-item list -> 1 + 3 + 1 + 2 = 7 nodes
    targets_per_level = max(1, per_level // 7)
    for level in range(LEVELS):
        lines = []
        if level:
            lines.append(f'-- extends "level{level - 1}.yaml"')
        # the root declares every level's block; each level fills in its own
        for block in range(LEVELS) if level == 0 else [level]:
            lines.append(f"[b{block}]")
            lines.append("== super()" if level else "")
            if block == level:
                for i in range(targets_per_level):
                    lines += [
                        f"t{level}_{i}: !singleton:collections:OrderedDict",
                        f"    alpha: {i}",
                        f"    beta: {i * 0.5}",
                        f"    name: 'node {level} {i} ## not a comment'",
                        f"    items: [{i}, {i + 1}]",
                    ]
        (root / f"level{level}.yaml").write_text("\n".join(lines) + "\n")
    return root / f"level{LEVELS - 1}.yaml"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_chain(Path(tmp), n)
            rendered = render(config)
            ir = load(rendered)
            fgc_s = best_of(lambda: load(render(config)), args.repeat)
            base_s = best_of(lambda: yaml.load(rendered.text, Loader=BaselineLoader), args.repeat)
        rows.append(
            {
                "nodes": len(ir.g),
                "fgc_frontend_s": round(fgc_s, 4),
                "pyyaml_safeloader_s": round(base_s, 4),
                "ratio": round(fgc_s / base_s, 2),
                "fgc_us_per_node": round(fgc_s / len(ir.g) * 1e6, 1),
            }
        )
    print_table(rows, args.csv)


if __name__ == "__main__":
    sys.exit(main())
