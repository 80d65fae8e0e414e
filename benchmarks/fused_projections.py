"""Benchmark: fused QKV and gate/up projections against separate ones, forward and backward.

Issue #18 lists fusing the q, k and v projections into one matmul (and the MLP's gate and up
projections into another) as a mean to measure. The generated model keeps them separate (the
Hugging Face names and shapes, which the tensor-parallel plans, checkpoints and export use). This
script measures what fusing would gain, on the projections alone, at the trainer benchmark's two
shapes (`benchmarks/trainer.py`): for each projection group and precision, one forward and
backward of the separate linears (`F.linear` per weight) against one linear over the
concatenated weights whose output is split, on the same input and output gradients.

- `fp32`: fp32 weights and activations;
- `bf16-mixed`: fp32 weights under `torch.autocast("cpu", torch.bfloat16)`, as the trainer's
  bf16-mixed runs them (each weight is cast to bf16 in the forward, so fusing also merges those
  casts).

Columns: milliseconds per forward+backward of one layer's group, separate and fused (best of
ROUNDS runs of REPS), the ratio, the time a step would save over the model's layers, and
`max_abs_diff`, the largest difference between the fused and the separate outputs (rounding
only: the fused weight is the separate weights stacked).

    python benchmarks/fused_projections.py [--shapes example,h256] [--reps 20] [--rounds 5]
                                           [--threads N] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from _table import best_ms, print_table
from _loops import EXAMPLE_SHAPE, H256_SHAPE  # last: it leaves sys.path

import torch
import torch.nn.functional as F

SHAPES = {"example": EXAMPLE_SHAPE, "h256": H256_SHAPE}
PRECISIONS = ("fp32", "bf16-mixed")


def groups(shape: dict) -> dict[str, list[int]]:
    """The output widths of each projection group of one decoder layer of SHAPE."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    return {
        "q,k,v": [shape["hidden_size"], kv, kv],
        "gate,up": [shape["intermediate_size"]] * 2,
    }


def measure(shape: dict, widths: list[int], precision: str, reps: int, rounds: int) -> dict:
    """Separate and fused forward+backward times of one projection group, and their outputs' gap."""
    torch.manual_seed(0)
    tokens, hidden = shape["batch_size"] * shape["seq_len"], shape["hidden_size"]
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights = [(torch.randn(w, hidden) * hidden**-0.5).requires_grad_() for w in widths]
    fused = torch.cat([w.detach() for w in weights]).requires_grad_()
    grads = [torch.randn(tokens, w) for w in widths]
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None

    def region():
        return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()

    def separate():
        with region():
            outs = [F.linear(x, w) for w in weights]
        torch.autograd.backward(outs, grads)
        return outs

    def together():
        with region():
            outs = F.linear(x, fused).split(widths, dim=-1)
        torch.autograd.backward(outs, grads)
        return outs

    gap = max(float((a - b).detach().float().abs().max()) for a, b in zip(separate(), together()))
    return {
        "separate_ms": best_ms(separate, reps, rounds),
        "fused_ms": best_ms(together, reps, rounds),
        "max_abs_diff": gap,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="example,h256")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for group, widths in groups(shape).items():
            for precision in PRECISIONS:
                m = measure(shape, widths, precision, args.reps, args.rounds)
                layers = shape["num_hidden_layers"]
                rows.append(
                    {
                        "shape": name,
                        "projections": group,
                        "precision": precision,
                        "separate_ms": round(m["separate_ms"], 3),
                        "fused_ms": round(m["fused_ms"], 3),
                        "fused_speedup": round(m["separate_ms"] / m["fused_ms"], 2),
                        "saved_ms_per_step": round(layers * (m["separate_ms"] - m["fused_ms"]), 2),
                        "max_abs_diff": f"{m['max_abs_diff']:.1e}",
                    }
                )
    print_table(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
