"""Benchmark: `fgc build` of the main example, stage by stage, next to a bare `import torch`.

Each measurement runs in a fresh Python process (imports are part of what a user waits for).
Goal: a whole build of the main example in at most 2x a torch import.

    python benchmarks/build.py [--repeat 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"

# Runs the build's stages in order in one fresh process and prints their times as JSON.
STAGES = r"""
import json, sys, tempfile, time
from pathlib import Path
t = {}
s = time.perf_counter()
import fgc.build, fgc.codegen.package
from fgc.frontend.render import render
from fgc.frontend.loader import load
from fgc_lowering.context import LoweringContext
from fgc_lowering.pipeline import lower
t["import fgc"] = time.perf_counter() - s; s = time.perf_counter()
rendered = render(sys.argv[1])
t["render"] = time.perf_counter() - s; s = time.perf_counter()
ir = load(rendered)
t["load"] = time.perf_counter() - s; s = time.perf_counter()
ctx = LoweringContext(rendered.source.path, rendered.source.search_path, {})
ctx.template_names = rendered.referenced
ir = lower(ir, ctx)
t["lower"] = time.perf_counter() - s; s = time.perf_counter()
builder = fgc.codegen.package.PackageBuilder(rendered, ir, ctx)
common = builder.common()
builder.model_py(common)
t["codegen model.py"] = time.perf_counter() - s; s = time.perf_counter()
builder.train_py(common, "0" * 64)
t["codegen train.py"] = time.perf_counter() - s; s = time.perf_counter()
builder.data_files()
t["tokenize data"] = time.perf_counter() - s; s = time.perf_counter()
compiled = fgc.build.Compiled(rendered, ir, ctx)
with tempfile.TemporaryDirectory() as tmp:
    fgc.build.build_package(compiled, Path(tmp) / "out")
t["build_package: codegen again, write, smoke check"] = time.perf_counter() - s
print(json.dumps(t))
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    torch_s = min(timed([sys.executable, "-c", "import torch"]) for _ in range(args.repeat))
    with tempfile.TemporaryDirectory() as tmp:
        build_s = min(
            timed([sys.executable, "-m", "fgc", "build", str(EXAMPLE), "-o", f"{tmp}/out{i}"])
            for i in range(args.repeat)
        )
    stages = json.loads(
        subprocess.run([sys.executable, "-c", STAGES, str(EXAMPLE)], check=True, capture_output=True, text=True).stdout
    )
    rows = [("baseline: python -c 'import torch'", torch_s)]
    rows += [(f"  stage: {name}", sec) for name, sec in stages.items()]
    rows += [("fgc build examples/tiny_llama/train.yaml", build_s), ("ratio build / torch import", build_s / torch_s)]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        unit = "x" if name.startswith("ratio") else "s"
        print(f"{name:<{width}}  {value:8.3f}{unit}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([("what", "seconds")] + rows)


if __name__ == "__main__":
    main()
