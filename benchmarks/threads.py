"""Benchmark: tokens/s of the main example's generated trainer on the CPU by the threads each of its
processes computes with.

torchrun, starting more than one process on a node with OMP_NUM_THREADS unset, sets it to 1 for
each of them; the generated trainer, on a CPU device, replaces that with this node's cores over
its processes (fgc_runtime/threads.py), and `--cpu-threads N` chooses N. The rows, each a fresh
process (or torchrun job) of the main example's package, OMP_NUM_THREADS unset as a user's shell
has it:
- `1 process, --cpu-threads 1`: one process on one thread, what torchrun leaves each process: the
  baseline of the one-process rows;
- `1 process`: torch's own count, the cores the process may run on;
- `2 processes, --cpu-threads 1`: the ddp package under torchrun, one thread each, as torchrun
  sets it: the baseline of the two-process rows;
- `2 processes`: the trainer's choice, this node's cores over its 2 processes (1 on a 2-core
  machine, where it is the row above);
- `2 processes, --cpu-threads C`: every core for each process, C being the cores (more threads
  than cores in all).
`threads_each` is what each process computes with, `vs_one_thread` each row's tokens/s over the
1-thread row of its number of processes: the median over the rounds of the two rows' ratio
within a round (every other round in the reverse order), as benchmarks/trainer.py judges its
goals. A row's tokens/s is the global rate of the run's second log interval, its best over the
rounds.

    python benchmarks/threads.py [--steps N] [--rounds N] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _table import print_table

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
import torch

from fgc.build import build_package, compile_config
from fgc_runtime.threads import usable_cores


def run_rate(package: Path, processes: int, threads: int | None, steps: int, out: Path) -> float:
    """The global tokens/s of the second log interval of a fresh run of PACKAGE on PROCESSES
    processes (torchrun when more than one), with `--cpu-threads THREADS` when given."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)
    ]
    flags = ["--output-dir", str(out), "--resume", "never", "--overwrite", "--device", "cpu", "--eval-every", "0",
             "--save-every", "0", "--max-steps", str(2 * steps), "--log-every", str(steps)]
    if threads is not None:
        flags += ["--cpu-threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run([*launcher, str(package / "train.py"), *flags], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"the run failed:\n{run.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r][-1]["tokens_per_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of each log interval (the second is timed)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every row")
    parser.add_argument("--csv", type=Path, help="the table as CSV")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    cores = usable_cores()
    default_threads = torch.get_num_threads()
    print(f"{cores} cores this process may use, torch {torch.__version__}; torch's own threads: {default_threads}")
    # (row, processes, --cpu-threads or None, threads each, the row it is compared with)
    rows = [
        ("1 process, --cpu-threads 1", 1, 1, 1, 0),
        ("1 process", 1, None, default_threads, 0),
        ("2 processes, --cpu-threads 1", 2, 1, 1, 2),
        ("2 processes", 2, None, max(1, cores // 2), 2),
        (f"2 processes, --cpu-threads {cores}", 2, cores, cores, 2),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packages = {}
        for trainer in ("basic", "ddp"):
            packages[trainer] = tmp / trainer
            build_package(compile_config(EXAMPLE, variables={"trainer_type": trainer}), packages[trainer])
        history = [[] for _ in rows]
        for turn in range(args.rounds):
            order = list(range(len(rows)))
            for i in order[::-1] if turn % 2 else order:
                _, processes, threads, _, _ = rows[i]
                package = packages["basic" if processes == 1 else "ddp"]
                history[i].append(run_rate(package, processes, threads, args.steps, tmp / f"run{i}"))
    table = []
    for (name, processes, _, each, base), rates in zip(rows, history):
        ratio = statistics.median(a / b for a, b in zip(rates, history[base]))
        table.append({
            "row": name,
            "processes": processes,
            "threads_each": each,
            "tokens_per_s": round(max(rates)),
            "vs_one_thread": f"{ratio:.2f}",
            "each_round": ", ".join(f"{r:,.0f}" for r in rates),
        })
    print_table(table, args.csv)


if __name__ == "__main__":
    main()
