"""Benchmark: `fgc build` of the main example, stage by stage, next to a bare `import torch`.

Each measurement runs in a fresh Python process (imports are part of what a user waits for),
with Python's bytecode of every module compiled beforehand, fgc's as well as torch's (as any
installed package has it); each repeat times the torch import and each kind of build once, and
the best of each counts.
Goal: a whole build of the main example in at most 1.5x a torch import (GOAL below); the table's
last line says whether this machine meets it, cold and warm:

- cold: fgc's cache off (``FGC_CACHE_DIR=off``): every step computed, as in a first build;
- warm: the cache (a fresh directory) filled by one build of the config before (a rebuild);
- after an edit: a warm build with a new ``max_steps`` each time (train.py is made afresh, the
  rest read back), printed in the first column of its row.

    python benchmarks/build.py [--repeat 3] [--csv out.csv]

The stages are those of one `fgc build` (fgc.cli's build command, run once, in process), each
timed where the build does it: the imports (torch comes in with the lowering passes), the
render, the lowering, the code generation (one run; black's share, its worker process's
answers, shown apart), the smoke check and the rest (output-directory checks, writing,
installing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
# black in a worker process, started before torch's import, as the `fgc` command's build does
from fgc.codegen import black_worker
black_worker.running().__enter__()
t["import fgc (cli, frontend; no torch)"] = time.perf_counter() - start
s = time.perf_counter()
import torch
t["import torch (the lowering passes need it)"] = time.perf_counter() - s
s = time.perf_counter()
import fgc_lowering.pipeline
t["import lowering"] = time.perf_counter() - s
s = time.perf_counter()
import fgc.codegen.package as package, fgc.codegen.smoke
t["import codegen (libcst, jinja2)"] = time.perf_counter() - s
timed(fgc.build, "render", "render")
timed(fgc.frontend.loader, "load", "load")
timed(fgc_lowering.pipeline, "lower", "lower")
timed(package.PackageBuilder, "model_py", "codegen model.py (vendoring, black)")
timed(package.PackageBuilder, "train_py", "codegen train.py (black)")
timed(package, "format_python", "  of which black (the worker's answers)")
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
    "codegen model.py (vendoring, black)", "codegen train.py (black)", "  of which black (the worker's answers)",
    "codegen: runtime files", "smoke check (compile every file, build_model on meta)",
    "rest: output checks, write, install", "the build command, all of it"]
print(json.dumps({k: t.get(k, 0.0) for k in order}))
"""


def timed(cmd: list[str], env: dict) -> float:
    """Seconds CMD takes to run (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> None:
    """Measure, print the table (and write the CSV)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # Python's bytecode of every module, fgc's too, as an installed package has it (pip
        # compiles it on install): written under TMP by the first runs, read by the timed ones.
        # Without it, where PYTHONDONTWRITEBYTECODE is set (this development machine's shells)
        # and fgc is installed editable, each build compiles fgc's own source first.
        python = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        python["PYTHONPYCACHEPREFIX"] = f"{tmp}/pycache"
        cold = dict(python, FGC_CACHE_DIR="off")
        warm = dict(python, FGC_CACHE_DIR=f"{tmp}/cache")
        torch_import = [sys.executable, "-c", "import torch"]
        build = [sys.executable, "-m", "fgc", "build", str(EXAMPLE), "-o"]
        timed(torch_import, python)
        timed([*build, f"{tmp}/first"], cold)  # the bytecode
        timed([*build, f"{tmp}/fill"], warm)  # fills fgc's cache
        # each repeat times every kind once, so that a machine whose speed drifts (another job
        # starting) moves them together; the best of each counts
        times: dict[str, list[float]] = {"torch": [], "cold": [], "warm": [], "edit": []}
        for i in range(args.repeat):
            times["torch"].append(timed(torch_import, python))
            times["cold"].append(timed([*build, f"{tmp}/cold{i}"], cold))
            times["warm"].append(timed([*build, f"{tmp}/warm{i}"], warm))
            # a rebuild after an edit: one new value (train.py changes, model.py does not)
            times["edit"].append(timed([*build, f"{tmp}/edit{i}", "-D", f"max_steps={1000 + i}"], warm))
        torch_s, cold_s, warm_s, edit_s = (min(times[k]) for k in ("torch", "cold", "warm", "edit"))
        stages = {
            name: json.loads(
                subprocess.run(
                    [sys.executable, "-c", STAGES, str(EXAMPLE)], check=True, capture_output=True, text=True, env=env
                ).stdout
            )
            for name, env in (("cold", cold), ("warm", warm))
        }
    rows = [("baseline: python -c 'import torch'", torch_s, None)]
    rows += [(f"  stage: {name}", sec, stages["warm"][name]) for name, sec in stages["cold"].items()]
    rows += [
        ("fgc build examples/tiny_llama/train.yaml", cold_s, warm_s),
        ("ratio build / torch import", cold_s / torch_s, warm_s / torch_s),
        ("warm, after an edit: -D max_steps=N, a new N each time", edit_s, None),
        ("ratio edit build / torch import", edit_s / torch_s, None),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'cold':>9}  {'warm':>9}")
    for name, a, b in rows:
        unit = "x" if name.startswith("ratio") else "s"
        second = f"  {b:8.3f}{unit}" if b is not None else ""
        print(f"{name:<{width}}  {a:8.3f}{unit}{second}")
    verdicts = ["PASS" if r <= GOAL else "FAIL" for r in (cold_s / torch_s, warm_s / torch_s)]
    print(f"{'goal: build <= ' + str(GOAL) + 'x torch import':<{width}}  {verdicts[0]:>9}  {verdicts[1]:>9}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows(
                [("what", "cold_s", "warm_s")] + rows + [(f"goal {GOAL}x", *verdicts)]
            )


if __name__ == "__main__":
    main()
