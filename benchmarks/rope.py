"""The rotary embedding's backward in a compiled bf16 training step on the CPU: autograd's against
the written-out one.

`fgc_runtime.kernels.apply_rope` rotates bf16 queries and keys with its backward written out
(`_BF16RopeTorch`): eager it is bitwise the gradient autograd derives, but under `torch.compile`
on the CPU the derived backward goes through `slice_backward`, which inductor turns into masked
bf16 loads. This script builds the main example at `precision=bf16-mixed` with `-D compile=true
-D fused_optimizer=true`, and runs the generated trainer's own `main()` both ways:

- `autograd's`: the baseline, `apply_rope_torch` under autograd (the backward it derives);
- `written out`: what the runtime runs.

Each runs in a process of its own, with `--threads` threads. For each: tokens/s (the best of the
rounds); the compiled rotation kernels' time per step (inductor's kernels whose names show the
rotation, `neg` and `slice`, under torch's profiler with
`torch._inductor.config.cpp.enable_kernel_profile`); all compiled kernels' time per step; how many
compiled kernels zero-pad a slice's gradient (`slice_backward`); and the last logged loss, which
the two must share to bf16 rounding.

    python benchmarks/rope.py [--shapes example,h256] [--steps 10] [--rounds 3] [--csv FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from _table import print_table, shape_names
from _loops import EXAMPLE_SHAPE, H256_SHAPE, LR, import_train_module, steady_record  # last: it leaves sys.path

import torch
import torch._inductor.config as inductor_config

from fgc.build import build_package, compile_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
TINY_SHAPE = dict(EXAMPLE_SHAPE, hidden_size=32, num_hidden_layers=1, intermediate_size=64, seq_len=32, batch_size=4)
SHAPES = {"example": EXAMPLE_SHAPE, "h256": H256_SHAPE, "tiny": TINY_SHAPE}
BACKWARDS = ("autograd's", "written out")


def run(train, steps: int, profile: bool = False) -> tuple[float, float, dict]:
    """Tokens/s of the trainer's second log interval of STEPS steps, its last loss and, with
    PROFILE, the compiled rotation kernels' and all compiled kernels' milliseconds per step, and
    how many compiled kernels zero-pad a slice's gradient (``slice_backward`` in their names)."""
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) if profile else contextlib.nullcontext() as prof:
        record = steady_record(train, steps)
    kernel_times = {}
    if prof is not None:
        kernels = [e for e in prof.key_averages() if e.key.startswith("graph_")]  # inductor's kernels
        rotation = [e for e in kernels if "neg" in e.key and "slice" in e.key]
        rotation_ms = sum(e.self_cpu_time_total for e in rotation) / 1e3 / (2 * steps)
        kernels_ms = sum(e.self_cpu_time_total for e in kernels) / 1e3 / (2 * steps)
        padding = sum("slice_backward" in e.key for e in kernels)
        kernel_times = {"rotation_ms": rotation_ms, "kernels_ms": kernels_ms, "slice_backward": padding}
    return record["tokens_per_s"], record["loss"], kernel_times


def use_backward(backward: str) -> None:
    """Make the loaded package's apply_rope run BACKWARD (one of BACKWARDS) for bf16 tensors."""
    if backward == "autograd's":
        rope = sys.modules["fgc_runtime.kernels.rope"]  # the package's, as train imported it
        rope._BF16RopeTorch = types.SimpleNamespace(apply=rope.apply_rope_torch)


def child(package: Path, backward: str, steps: int, rounds: int) -> None:
    """One backward in a process of its own (torch.compile's caches stay apart): print its JSON row."""
    inductor_config.cpp.enable_kernel_profile = True  # each compiled kernel a profiler event
    train = import_train_module(package)
    use_backward(backward)
    run(train, 1)  # compiles
    rate = max(run(train, steps)[0] for _ in range(rounds))
    _, loss, kernel_times = run(train, steps, profile=True)
    print(json.dumps({"rate": rate, "loss": loss} | kernel_times))


def measure(name: str, shape: dict, args, tmp: Path) -> list[dict]:
    variables = dict(
        shape, trainer_type="basic", precision="bf16-mixed", lr=LR, max_steps=2 * args.steps,
        compile=True, fused_optimizer=True,
    )
    package = tmp / name
    build_package(compile_config(EXAMPLE, variables=variables), package)
    results = {}
    for backward in BACKWARDS:
        command = [sys.executable, __file__, "--child", str(package), backward, str(args.steps), str(args.rounds)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name}, {backward}: the trainer failed:\n{proc.stderr[-4000:]}")
        results[backward] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results[BACKWARDS[0]]["rate"]
    return [
        {
            "shape": name,
            "backward": backward,
            "tokens_per_s": round(r["rate"]),
            "vs_autograd": f"{r['rate'] / base:.2f}",
            "rotation_kernels_ms": f"{r['rotation_ms']:.2f}",
            "compiled_kernels_ms": f"{r['kernels_ms']:.2f}",
            "slice_backward_kernels": r["slice_backward"],
            "last_loss": f"{r['loss']:.4f}",
        }
        for backward, r in results.items()
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="example,h256", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="steps of each log interval (a run has two)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each backward; the best rate counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--csv", type=Path, help="the table as CSV")
    args = parser.parse_args(argv)
    args.shapes = shape_names(parser, args.shapes, SHAPES)
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        package, backward, steps, rounds = argv[1:]
        return child(Path(package), backward, int(steps), int(rounds))
    args = parse_args(argv)
    print(f"{args.threads} threads, torch {torch.__version__}, bf16-mixed, compile, fused AdamW")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            rows += measure(name, SHAPES[name], args, Path(tmp))
    print_table(rows, args.csv)


if __name__ == "__main__":
    main()
