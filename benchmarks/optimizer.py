"""Benchmark: the optimizer step alone, over parameters of the trainer benchmark's shapes, for
issue #18's bf16 goal (bf16 weights at least at the bf16-mixed rate), whose two trainers differ by
their optimizer step.

For each shape of `--shapes` (`example`, `h256`: the shapes of benchmarks/trainer.py), the
parameters of transformers' Llama of that shape (`--vocab` 257, the example's byte vocabulary),
each with a fixed random gradient, stepped by (AdamW, lr 1e-3, betas (0.9, 0.95), weight decay
0.1, as in the trainer benchmark):
- `torch AdamW, fused` on fp32 weights: the baseline, the step of the trainer's bf16-mixed rows
  built with `-D fused_optimizer=true`;
- `torch AdamW, foreach` on fp32 weights: torch's default step;
- `fgc AdamW, fused` on fp32 weights, and on bf16 weights rounded to nearest (the fused step's
  CPU kernel, fgc_runtime.cpu_adamw);
- `fgc AdamW, fused, stochastic rounding` on bf16 weights: the step of the bf16 rows
  (`-D precision=bf16 -D bf16_stochastic_round=true -D fused_optimizer=true`);
- `..., torch.compile's kernel`: the same step by the function torch.compile makes of it, the
  step's fallback where the CPU kernel does not build (the same values);
- `fgc AdamW, stochastic rounding` on bf16 weights: the step parameter by parameter.

The steps take turns for `--rounds` rounds (every other round in the reverse order), `--steps`
steps a turn after a warm-up (the fused steps compile in their first call). `ms` is a step's
best time over the rounds; `vs_torch_fused` the median over the rounds of the baseline's time
over the step's in the same round (above 1: faster than torch's fused step).

    python benchmarks/optimizer.py [--shapes example,h256] [--steps 20] [--rounds 5]
                                   [--threads N] [--vocab 257] [--csv out.csv]
"""

from __future__ import annotations

import os

# Inductor compiles in worker processes by default; on a small machine they would compete with
# the steps being timed.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import statistics
import time
from pathlib import Path

from _table import print_table, shape_names
# last: _loops leaves sys.path
from _loops import BETAS, EXAMPLE_SHAPE, H256_SHAPE, LR, WEIGHT_DECAY, hf_llama

import torch
from fgc_runtime import optim

SHAPES = {"example": EXAMPLE_SHAPE, "h256": H256_SHAPE}
BASELINE = "torch AdamW, fused"
HYPER = {"lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY}
# name -> (the weights' dtype, the optimizer of a list of parameters)
CASES = {
    BASELINE: (torch.float32, lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
    "torch AdamW, foreach": (torch.float32, lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)),
    "fgc AdamW, fused": (torch.float32, lambda ps: optim.AdamW(ps, **HYPER, fused=True, seed=0)),
    "fgc AdamW, fused, bf16 to nearest": (torch.bfloat16, lambda ps: optim.AdamW(ps, **HYPER, fused=True, seed=0)),
    "fgc AdamW, fused, stochastic rounding": (
        torch.bfloat16,
        lambda ps: optim.AdamW(ps, **HYPER, bf16_stochastic_round=True, fused=True, seed=0),
    ),
    "fgc AdamW, fused, stochastic rounding, torch.compile's kernel": (
        torch.bfloat16,
        lambda ps: compiled_kernel(optim.AdamW(ps, **HYPER, bf16_stochastic_round=True, fused=True, seed=0)),
    ),
    "fgc AdamW, stochastic rounding": (
        torch.bfloat16,
        lambda ps: optim.AdamW(ps, **HYPER, bf16_stochastic_round=True, seed=0),
    ),
}


def compiled_kernel(optimizer: optim.AdamW) -> optim.AdamW:
    """OPTIMIZER with its fused step's compiled function where it would use the CPU kernel."""
    optimizer._cpu_kernel = False
    return optimizer


def parameter_shapes(shape: dict, vocab: int) -> list[torch.Size]:
    """The shapes of the parameters of transformers' Llama of SHAPE (made on the meta device)."""
    with torch.device("meta"):
        model = hf_llama(shape, vocab)
    return [p.shape for p in model.parameters()]


def parameters(shapes: list[torch.Size], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Parameters of SHAPES in DTYPE, each with a gradient (seed 0: the same values for every case)."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for size in shapes:
        param = torch.nn.Parameter((0.02 * torch.randn(size, generator=generator)).to(dtype))
        param.grad = (1e-3 * torch.randn(size, generator=generator)).to(dtype)
        params.append(param)
    return params


def measure_shape(name: str, args) -> list[dict]:
    """The rows of shape NAME."""
    shapes = parameter_shapes(SHAPES[name], args.vocab)
    steps, dtypes = {}, {}
    for case, (dtype, make) in CASES.items():
        optimizer = make(parameters(shapes, dtype))
        optimizer.step()  # a warm-up step, the compilation of the fused ones
        steps[case], dtypes[case] = optimizer.step, dtype
    history = {case: [] for case in steps}  # each case's ms a step in each round
    for turn in range(args.rounds):
        order = list(steps) if turn % 2 == 0 else list(steps)[::-1]
        for case in order:
            step = steps[case]
            step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            history[case].append(1e3 * (time.perf_counter() - start) / args.steps)
    return [
        {
            "shape": name,
            "step": case,
            "weights": "bf16" if dtypes[case] == torch.bfloat16 else "fp32",
            "tensors": len(shapes),
            "values": sum(s.numel() for s in shapes),
            "ms": f"{min(history[case]):.3f}",
            "vs_torch_fused": f"{statistics.median(b / a for a, b in zip(history[case], history[BASELINE])):.2f}",
        }
        for case in steps
    ]


def main() -> None:
    """Parse the arguments, time the steps of each shape and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="example,h256", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=20, help="steps a turn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vocab", type=int, default=257)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    names = shape_names(parser, args.shapes, SHAPES)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; {args.rounds} rounds of {args.steps} steps a step kind; baseline: {BASELINE} (fp32)")
    rows = [row for name in names for row in measure_shape(name, args)]
    print_table(rows, args.csv)


if __name__ == "__main__":
    main()
