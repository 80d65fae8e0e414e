"""Benchmark: `fgc build` of the main example, stage by stage, next to a bare `import torch`.

Each measurement runs in a fresh Python process (imports are part of what a user waits for).
Goal: a whole build of the main example in at most 1.5x a torch import (GOAL below); the table's
last line says whether this machine meets it.

    python benchmarks/build.py [--repeat 3] [--csv out.csv]

The stages are those of one `fgc build` (fgc.cli's build command, run once, in process), each
timed where the build does it: the imports (torch comes in with the lowering passes), the
render, the lowering, the code generation (one run; black's share shown apart), the smoke
check and the rest (output-directory checks, writing, installing).
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
GOAL = 1.5  # the whole build, in torch imports

# One `fgc build` in a fresh process, with timers around its stages; prints them as JSON.
STAGES = r"""
import functools, json, sys, tempfile, time
from pathlib import Path
t = {}
def timed(owner, name, label):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        s = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            t[label] = t.get(label, 0.0) + time.perf_counter() - s
    setattr(owner, name, wrapper)
start = time.perf_counter()
import fgc.build, fgc.cli, fgc.frontend.loader
t["import fgc (cli, frontend; no torch)"] = time.perf_counter() - start
s = time.perf_counter()
import torch
t["import torch (the lowering passes need it)"] = time.perf_counter() - s
s = time.perf_counter()
import fgc_lowering.pipeline
t["import lowering"] = time.perf_counter() - s
s = time.perf_counter()
import fgc.codegen.package as package, fgc.codegen.smoke
t["import codegen (libcst, black, jinja2)"] = time.perf_counter() - s
timed(fgc.build, "render", "render")
timed(fgc.frontend.loader, "load", "load")
timed(fgc_lowering.pipeline, "lower", "lower")
timed(package.PackageBuilder, "model_py", "codegen model.py (vendoring, black)")
timed(package.PackageBuilder, "train_py", "codegen train.py (black)")
timed(package, "format_python", "  of which black (both files)")
timed(package.PackageBuilder, "runtime_files", "codegen: runtime files")
timed(package.PackageBuilder, "build", "codegen: the whole package, once")
timed(fgc.build, "_smoke", "smoke check (compile every file, build_model on meta)")
with tempfile.TemporaryDirectory() as tmp:
    s = time.perf_counter()
    try:
        fgc.cli.main(["build", sys.argv[1], "-o", f"{tmp}/out"], standalone_mode=False)
    except SystemExit as exc:  # click's exit: only a failed build is worth stopping for
        if exc.code not in (0, None):
            raise
    t["the build command, all of it"] = time.perf_counter() - s
inside = ["render", "load", "lower", "codegen: the whole package, once", "smoke check (compile every file, build_model on meta)"]
t["rest: output checks, write, install"] = t["the build command, all of it"] - sum(t.get(k, 0.0) for k in inside)
order = list(t)[:4] + ["render", "load", "lower", "codegen: the whole package, once",
    "codegen model.py (vendoring, black)", "codegen train.py (black)", "  of which black (both files)",
    "codegen: runtime files", "smoke check (compile every file, build_model on meta)",
    "rest: output checks, write, install", "the build command, all of it"]
print(json.dumps({k: t.get(k, 0.0) for k in order}))
"""


def timed(cmd: list[str]) -> float:
    """Seconds CMD takes to run (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    """Measure, print the table (and write the CSV)."""
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
    ratio = build_s / torch_s
    rows = [("baseline: python -c 'import torch'", torch_s)]
    rows += [(f"  stage: {name}", sec) for name, sec in stages.items()]
    rows += [("fgc build examples/tiny_llama/train.yaml", build_s), ("ratio build / torch import", ratio)]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        unit = "x" if name.startswith("ratio") else "s"
        print(f"{name:<{width}}  {value:8.3f}{unit}")
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"{'goal: build <= ' + str(GOAL) + 'x torch import':<{width}}  {verdict:>9}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([("what", "seconds")] + rows + [(f"goal {GOAL}x", verdict)])


if __name__ == "__main__":
    main()
