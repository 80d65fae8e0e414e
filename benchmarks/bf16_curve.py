"""Benchmark: is training with bf16 weights (`-D precision=bf16`, fp32 optimizer state, the update
written back with stochastic rounding) as good as bf16-mixed (fp32 weights under bf16 autocast),
step for step? Issue #18's goal: the loss curve over 300 steps within noise of bf16-mixed.

For each shape (the main example's defaults, and `h256` of benchmarks/trainer.py) the main example
is built twice, one process (`trainer_type=basic`), `max_steps=STEPS`, its own schedule:
- `bf16-mixed`: `-D precision=bf16-mixed`;
- `bf16`: `-D precision=bf16 -D bf16_stochastic_round=true` (fgc_runtime.optim.AdamW).
Each package trains STEPS steps from each of SEEDS seeds (the seed sets the initial weights and the
data order), in its own process, logging every step. The noise is what changing the seed does to
bf16-mixed: for every window of WINDOW steps, the spread of its mean loss over the seeds. The table
shows each window's mean loss over the seeds for both precisions, their difference, and the
bf16-mixed runs' standard deviation there (over seeds); the verdict compares the last window's
difference of means with its standard error (the two precisions' seed deviations over sqrt(seeds)
combined): within noise when the difference is at most 2 standard errors.

    python benchmarks/bf16_curve.py [--shapes example,h256] [--steps 300] [--seeds 3] [--window 50]
                                    [--threads N] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _table import print_table, shape_names
from _loops import EXAMPLE_SHAPE, H256_SHAPE  # last: it leaves sys.path

from fgc.build import build_package, compile_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
SHAPES = {
    "example": EXAMPLE_SHAPE,
    "h256": H256_SHAPE,
}
PRECISIONS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    "bf16": {"precision": "bf16", "bf16_stochastic_round": True},
}


def losses(package: Path, out: Path, steps: int, seed: int, threads: int) -> list[float]:
    """The loss of every step of one run of PACKAGE's train.py, in a process of its own."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(package / "train.py"), "--output-dir", str(out), "--max-steps", str(steps),
           "--seed", str(seed), "--log-every", "1", "--eval-every", "0", "--resume", "never", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{package.name}, seed {seed}: train.py failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [by_step[s] for s in range(1, steps + 1)]


def curve_rows(name: str, curves: dict[str, list[list[float]]], window: int) -> list[dict]:
    """One row per window of WINDOW steps: each precision's mean loss over the seeds, their
    difference and the bf16-mixed runs' deviation over seeds."""
    steps = len(curves["bf16-mixed"][0])
    rows = []
    for start in range(0, steps, window):
        end = min(start + window, steps)
        means = {p: [statistics.fmean(run[start:end]) for run in runs] for p, runs in curves.items()}
        mixed, bf16 = statistics.fmean(means["bf16-mixed"]), statistics.fmean(means["bf16"])
        rows.append({
            "shape": name,
            "steps": f"{start + 1}-{end}",
            "bf16-mixed": f"{mixed:.4f}",
            "bf16": f"{bf16:.4f}",
            "bf16 - mixed": f"{bf16 - mixed:+.4f}",
            "seed std (mixed)": f"{_std(means['bf16-mixed']):.4f}",
            "seed std (bf16)": f"{_std(means['bf16']):.4f}",
        })
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def verdict(name: str, curves: dict[str, list[list[float]]], window: int) -> str:
    """The goal's line: the last window's difference of mean losses against its standard error."""
    last = {p: [statistics.fmean(run[-window:]) for run in runs] for p, runs in curves.items()}
    diff = statistics.fmean(last["bf16"]) - statistics.fmean(last["bf16-mixed"])
    n = len(last["bf16"])
    if n < 2:
        return f"{name}: last {window} steps, bf16 - bf16-mixed = {diff:+.4f}; one seed: no noise estimate (use --seeds 2 or more)"
    se = math.sqrt(_std(last["bf16"]) ** 2 / n + _std(last["bf16-mixed"]) ** 2 / n)
    met = abs(diff) <= 2 * se
    return (
        f"{name}: last {window} steps, bf16 - bf16-mixed = {diff:+.4f}, standard error {se:.4f} over {n} seeds "
        f"(goal: within 2 standard errors) -> {'met' if met else 'NOT met'}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="example", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    names = shape_names(parser, args.shapes, SHAPES)
    if args.steps < 1 or args.seeds < 1 or args.window < 1:
        parser.error("--steps, --seeds and --window must be at least 1")
    window = min(args.window, args.steps)
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            curves: dict[str, list[list[float]]] = {}
            for precision, knobs in PRECISIONS.items():
                variables = dict(SHAPES[name], trainer_type="basic", max_steps=args.steps, eval_every=0, **knobs)
                package = Path(tmp) / f"{name}_{precision}"
                build_package(compile_config(EXAMPLE, variables=variables), package)
                curves[precision] = [
                    losses(package, Path(tmp) / f"run_{name}_{precision}_{seed}", args.steps, seed, args.threads)
                    for seed in range(1, args.seeds + 1)
                ]
            rows += curve_rows(name, curves, window)
            verdicts.append(verdict(name, curves, window))
    print(f"loss over {args.steps} steps, mean over {args.seeds} seed(s) per precision, windows of {window} steps; "
          f"{args.threads} thread(s)")
    print_table(rows, args.csv)
    print()
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
