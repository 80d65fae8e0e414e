"""Benchmark: causal attention on the CPU in bf16, forward and backward, by query chunks against SDPA.

The generated model attends through `fgc_runtime.kernels.scaled_dot_product_attention`. On the
CPU, a compiled training step in bf16 (`-D compile=true` with `precision=bf16-mixed` or `bf16`)
runs `causal_attention_by_query_chunks`; everything else runs torch's flash kernel on inputs
upcast to fp32. This script times one forward and backward of causal attention with grouped
heads, on the same bf16 queries, keys, values and output gradients, at the trainer benchmark's
two shapes (`benchmarks/trainer.py`) and at longer sequences:

- `sdpa, fp32` (the baseline): what eager bf16 code runs, `F.scaled_dot_product_attention` on the
  inputs cast to fp32, the output cast back;
- `sdpa, bf16`: torch's kernel as called, in bf16;
- `sdpa, fp32, compile`: the baseline under `torch.compile` (inductor calls the same kernel);
- `by query chunks, compile`: what a compiled bf16 training step runs (up to T 512 its backward
  uses the probabilities the forward saved, beyond that it recomputes them);
- `by query chunks, compile, recomputed`: the same with the probabilities recomputed at every T.

Columns: milliseconds (best of ROUNDS runs of REPS calls), `vs_fp32` (the baseline's time over
the row's: above 1 is faster), `kept_mib`, what the forward keeps for the backward beyond the
inputs (MiB of the distinct storages autograd saves, q, k and v not counted), and `max_err`, the
largest difference of the output and the input gradients from fp64 SDPA on the same values, over
the largest magnitude of each (bf16 rounding is about 0.4% of a value).

    python benchmarks/attention.py [--shapes example,h256,t1024] [--reps 10] [--rounds 3]
                                   [--threads N] [--chunk 128] [--csv out.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _table import best_ms, print_table, shape_names
from _loops import EXAMPLE_SHAPE, H256_SHAPE  # last: it leaves sys.path

import torch
import torch.nn.functional as F

from fgc_runtime.kernels import attention, causal_attention_by_query_chunks


def _attention_shape(shape: dict) -> dict:
    return {
        "B": shape["batch_size"],
        "H": shape["num_attention_heads"],
        "K": shape["num_key_value_heads"],
        "T": shape["seq_len"],
        "E": shape["hidden_size"] // shape["num_attention_heads"],
    }


# B batch, H query heads, K key/value heads, T sequence, E head dim
SHAPES = {
    "example": _attention_shape(EXAMPLE_SHAPE),
    "h256": _attention_shape(H256_SHAPE),
    "t1024": {"B": 2, "H": 8, "K": 2, "T": 1024, "E": 64},
    "t2048": {"B": 1, "H": 8, "K": 2, "T": 2048, "E": 64},
    "tiny": {"B": 1, "H": 4, "K": 2, "T": 40, "E": 8},  # for the test, with --chunk 16
}


def sdpa_fp32(q, k, v):
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    return y.to(q.dtype)


def sdpa_as_called(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def loops() -> dict:
    return {
        "sdpa, fp32": sdpa_fp32,
        "sdpa, bf16": sdpa_as_called,
        "sdpa, fp32, compile": torch.compile(sdpa_fp32, dynamic=False),
        "by query chunks, compile": torch.compile(causal_attention_by_query_chunks, dynamic=False),
        "by query chunks, compile, recomputed": torch.compile(
            lambda q, k, v: causal_attention_by_query_chunks(q, k, v, save_probabilities=False), dynamic=False
        ),
    }


def forward_backward(fn, q, k, v, dy):
    """The output and the gradients of q, k and v of FN on fresh leaves of the same values."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def kept_bytes(fn, q, k, v) -> int:
    """Bytes of the distinct storages that autograd saves in FN's forward for its backward, the
    storages of the input leaves q, k and v not counted."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(kept.values())


def max_err(got: list, want: list) -> float:
    return max(float((g.double() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="example,h256,t1024", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--chunk", type=int, default=attention.CHUNK, help="queries per chunk (at least)")
    parser.add_argument("--csv", type=Path, help="the table as CSV")
    args = parser.parse_args(argv)
    args.shapes = shape_names(parser, args.shapes, SHAPES)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    attention.CHUNK = args.chunk
    print(f"{args.threads} threads, torch {torch.__version__}, {args.chunk} queries per chunk")
    rows = []
    for name in args.shapes:
        s = SHAPES[name]
        torch.manual_seed(0)
        q = torch.randn(s["B"], s["H"], s["T"], s["E"]).bfloat16()
        k, v = (torch.randn(s["B"], s["K"], s["T"], s["E"]).bfloat16() for _ in range(2))
        dy = torch.randn(s["B"], s["H"], s["T"], s["E"]).bfloat16()
        want = forward_backward(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            q.double(), k.double(), v.double(), dy.double(),
        )
        base = None
        for loop, fn in loops().items():
            err = max_err(forward_backward(fn, q, k, v, dy), want)
            ms = best_ms(lambda: forward_backward(fn, q, k, v, dy), args.reps, args.rounds)
            base = ms if base is None else base
            shape = f"B{s['B']} H{s['H']} K{s['K']} T{s['T']} E{s['E']}"
            kept = kept_bytes(fn, q, k, v) / 2**20
            rows.append({"shape": name, "dims": shape, "loop": loop, "ms": f"{ms:.2f}",
                         "vs_fp32": f"{base / ms:.2f}", "kept_mib": f"{kept:.3f}", "max_err": f"{err:.1e}"})
    print_table(rows, args.csv)


if __name__ == "__main__":
    main()
