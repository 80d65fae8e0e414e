"""Benchmark: fgc_runtime's Triton kernels (rms_norm, swiglu, apply_rope, cross_entropy) against
their torch twins, forward and forward+backward, at Llama-like shapes in bf16 and fp32, on a CUDA GPU.

Per kernel, shape, dtype and pass, the milliseconds of:
- `torch`: the torch twin (`rms_norm_torch`, `swiglu_torch`, `apply_rope_torch`,
  `fused_linear_cross_entropy(impl="torch")`), eager: the baseline, what `impl="torch"` (and
  `auto`) runs;
- `compile`: the same twin under `torch.compile(dynamic=False)`, what `-D compile=true` gives;
- `triton`: the Triton kernel (`impl="triton"`);
then `vs_torch` and `vs_compile` (their times over triton's: above 1 means triton is faster),
`triton_gb_s` (the bytes below over triton's time) and, where torch reports the GPU's memory clock
and bus width, `peak_bw` (that rate's share of the peak memory bandwidth, 2 x clock x bus width).

Shapes (B batch 8, T sequence 2048): rms_norm over hidden D = 2048 and 4096; swiglu over
intermediate F = 5632 and 11008; rope with H = 32 query heads, K = 8 key/value heads, head dim
D = 128, q and k laid out as the model makes them (`linear_out.view(B, T, H, D).transpose(1, 2)`),
cos and sin (B, T, D) in q's dtype; cross_entropy (the LM head and its loss, mean reduction) with
N = B*T rows of hidden D = 2048 against vocabularies V = 32,000 and 128,256, every 20th label
ignored; its twin materialises the logits. The Triton loss computes its gradients in the forward
(a training forward, inputs requiring grad), so its `fwd` time holds nearly all its work and its
backward only scales them. The rms_norm weight has x's dtype. Every input that gets a
gradient in training requires grad in both passes, so `fwd` is a training forward (the Triton
rms_norm saves its row statistics, as it does in training); `fwd+bwd` is that forward and
`torch.autograd.grad` of its outputs against fixed random output gradients.

Bytes counted (s = bytes per element of the dtype), what the pass must read and write at least,
each tensor once; what an implementation adds (the rms_norm row statistics, the partial weight
gradients) is not counted:
- rms_norm, N = B*T rows of D: fwd reads x and weight, writes y: (2*N*D + D) * s; bwd reads x,
  weight and dy, writes dx and dweight: (3*N*D + 2*D) * s; fwd+bwd is their sum.
- swiglu, N = B*T*F elements: fwd reads gate and up, writes y: 3*N*s; bwd reads gate, up and dy,
  writes dgate and dup: 5*N*s; fwd+bwd 8*N*s.
- rope: fwd reads q, k, cos and sin, writes q_out and k_out: (2*|q| + 2*|k| + 2*|cos|) * s, with
  |.| the number of elements; bwd the same again (reads dq_out, dk_out, cos, sin; writes dq, dk).
- cross_entropy: fwd reads hidden and weight: (N*D + V*D) * s; bwd reads them again and writes
  their gradients: 2 * (N*D + V*D) * s. It is bound by its matmuls (2*N*V*D flops each), not by
  memory, so its GB/s and peak_bw say little; its times are what count.

Timing, on CUDA: `triton.testing.do_bench` (CUDA events, L2 cache flushed before each call, the
median of as many calls as fit in `--rep-ms`), after one untimed call (torch.compile's compilation,
Triton's JIT) that also gives the results checked.

Correctness, per row: `max_abs_diff` is the largest |triton - torch twin| over the outputs (fwd) or
over the input gradients (fwd+bwd). `check` is `ok` when, for every output: in fp32, that
difference is at most 1e-5 x max(1, max |twin|); in bf16 (and fp16), triton's error against an fp32
reference (the twin on the same inputs upcast to fp32) is at most twice the bf16 twin's error
against it (or one bf16 epsilon x max |reference|, if larger). Otherwise `WRONG`, and the script
exits with status 1 after printing the table, so that a fast wrong kernel cannot look good.

Needs a CUDA GPU and triton: without a GPU it exits with status 2. `--interpret` instead runs
tiny shapes on the CPU in Triton's interpreter (TRITON_INTERPRET=1), each implementation once per
row (that one call, compilation included, is what it times), to check the script and the kernels'
results on a machine without a GPU: its timings mean nothing.

    python benchmarks/kernels.py [--kernels rms_norm,swiglu,rope,cross_entropy] [--dtypes bf16,fp32]
                                 [--rep-ms MS] [--warmup-ms MS] [--csv out.csv]
    python benchmarks/kernels.py --interpret
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from _table import print_table

# torch, triton and fgc_runtime's kernels are imported inside the functions: main() first sets
# TRITON_INTERPRET, which triton reads when it is first imported.

KERNELS = ("rms_norm", "swiglu", "rope", "cross_entropy")
DTYPES = ("bf16", "fp32")
PASSES = ("fwd", "fwd+bwd")
# Llama-like shapes (B, T and the kernel's own dims). The interpreter's are tiny (a few dozen rows)
# because it costs about 1 ms per Triton program.
SHAPES = {
    "rms_norm": [{"B": 8, "T": 2048, "D": 2048}, {"B": 8, "T": 2048, "D": 4096}],
    "swiglu": [{"B": 8, "T": 2048, "F": 5632}, {"B": 8, "T": 2048, "F": 11008}],
    "rope": [{"B": 8, "T": 2048, "H": 32, "K": 8, "D": 128}],
    "cross_entropy": [{"B": 4, "T": 1024, "D": 2048, "V": 32000}, {"B": 4, "T": 1024, "D": 2048, "V": 128256}],
}
# One shape per kernel, sizes that are not powers of two (masked blocks): each row costs a
# torch.compile on the CPU too.
INTERPRETER_SHAPES = {
    "rms_norm": [{"B": 2, "T": 16, "D": 96}],
    "swiglu": [{"B": 2, "T": 16, "F": 344}],
    "rope": [{"B": 2, "T": 12, "H": 3, "K": 2, "D": 24}],
    "cross_entropy": [{"B": 2, "T": 12, "D": 40, "V": 100}],
}
FP32_RTOL = 1e-5
ROPE_THETA = 10000.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench's warm-up time per measurement")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's timed time per measurement")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run tiny shapes on the CPU in Triton's interpreter, each row once (timings meaningless)",
    )
    parser.add_argument("--csv", type=Path, help="the table as CSV")
    args = parser.parse_args(argv)
    for option, allowed in (("kernels", KERNELS), ("dtypes", DTYPES)):
        values = getattr(args, option).split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"--{option}: unknown {unknown[0]!r}: expected one of {', '.join(allowed)}")
        setattr(args, option, values)
    return args


def fail(message: str) -> NoReturn:
    """A one-line user error on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@dataclass
class Case:
    """One kernel at one shape and dtype: its leaf inputs and the three ways to run it."""

    kernel: str
    shape: str
    inputs: list  # the arguments, in order (tensors, and non-tensor arguments such as eps)
    leaves: list  # the tensors that get gradients
    twin: Callable  # the torch twin: inputs -> output or tuple of outputs
    triton: Callable  # the Triton kernel, same signature
    fwd_bytes: int
    bwd_bytes: int


def outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def make_cases(kernel: str, shapes: list[dict], dtype, device) -> Iterator[Case]:
    """The Cases of KERNEL at SHAPES, random inputs in DTYPE on DEVICE, one at a time."""
    import torch

    from fgc_runtime.kernels.cross_entropy import fused_linear_cross_entropy
    from fgc_runtime.kernels.rms_norm import rms_norm_torch
    from fgc_runtime.kernels.rope import apply_rope_torch
    from fgc_runtime.kernels.swiglu import swiglu_torch
    from fgc_runtime.kernels.triton.cross_entropy import fused_linear_cross_entropy_triton
    from fgc_runtime.kernels.triton.rms_norm import rms_norm_triton
    from fgc_runtime.kernels.triton.rope import apply_rope_triton
    from fgc_runtime.kernels.triton.swiglu import swiglu_triton

    s = torch.finfo(dtype).bits // 8

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, device=device) * scale + shift).to(dtype)

    for dims in shapes:
        label = " ".join(f"{name}{value}" for name, value in dims.items())
        B, T = dims["B"], dims["T"]
        if kernel == "rms_norm":
            D = dims["D"]
            x_BTD = randn(B, T, D).requires_grad_()
            weight_D = randn(D, scale=0.1, shift=1.0).requires_grad_()
            n = B * T * D
            yield Case(
                kernel,
                label,
                [x_BTD, weight_D, 1e-6],
                [x_BTD, weight_D],
                rms_norm_torch,
                rms_norm_triton,
                fwd_bytes=(2 * n + D) * s,
                bwd_bytes=(3 * n + 2 * D) * s,
            )
        elif kernel == "swiglu":
            gate_BTF = randn(B, T, dims["F"]).requires_grad_()
            up_BTF = randn(B, T, dims["F"]).requires_grad_()
            n = gate_BTF.numel()
            yield Case(
                kernel,
                label,
                [gate_BTF, up_BTF],
                [gate_BTF, up_BTF],
                swiglu_torch,
                swiglu_triton,
                fwd_bytes=3 * n * s,
                bwd_bytes=5 * n * s,
            )
        elif kernel == "cross_entropy":
            D, V, N = dims["D"], dims["V"], B * T
            hidden_ND = randn(N, D).requires_grad_()
            weight_VD = randn(V, D, scale=D**-0.5).requires_grad_()
            labels_N = torch.randint(0, V, (N,), device=device)
            labels_N[::20] = -100
            ce_bytes = (N * D + V * D) * s
            yield Case(
                kernel,
                label,
                [hidden_ND, weight_VD, labels_N],
                [hidden_ND, weight_VD],
                lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl="torch"),
                fused_linear_cross_entropy_triton,
                fwd_bytes=ce_bytes,
                bwd_bytes=2 * ce_bytes,
            )
        else:
            H, K, D = dims["H"], dims["K"], dims["D"]
            # As the model makes them: a projection's output, viewed as heads and transposed (not
            # contiguous); leaves themselves, so that the gradients are the kernel's alone.
            q_BHTD = randn(B, T, H * D).view(B, T, H, D).transpose(1, 2).requires_grad_()
            k_BKTD = randn(B, T, K * D).view(B, T, K, D).transpose(1, 2).requires_grad_()
            # The model's tables: fp32 angles position * inv_freq, both halves, cast to q's dtype.
            inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, D, 2, device=device).float() / D)
            angles_TF = torch.arange(T, device=device).float()[:, None] * inv_freq
            angles_BTD = torch.cat((angles_TF, angles_TF), dim=-1).expand(B, T, D)
            cos_BTD, sin_BTD = angles_BTD.cos().to(dtype), angles_BTD.sin().to(dtype)
            rope_bytes = (2 * q_BHTD.numel() + 2 * k_BKTD.numel() + 2 * cos_BTD.numel()) * s
            yield Case(
                kernel,
                label,
                [q_BHTD, k_BKTD, cos_BTD, sin_BTD],
                [q_BHTD, k_BKTD],
                apply_rope_torch,
                apply_rope_triton,
                fwd_bytes=rope_bytes,
                bwd_bytes=rope_bytes,
            )


def runner(fn: Callable, inputs: list, leaves: list, grads: tuple | None) -> Callable:
    """A call of FN on INPUTS: its outputs (GRADS None), or the gradients of LEAVES given GRADS."""
    import torch

    if grads is None:
        return lambda: outputs(fn(*inputs))
    return lambda: torch.autograd.grad(outputs(fn(*inputs)), leaves, grads)


def upcast(case: Case, grads: tuple | None) -> tuple[list, list, tuple | None]:
    """CASE's inputs (and GRADS) as fp32 copies: the reference's inputs, same values (integer
    tensors, such as labels, as they are)."""
    import torch

    mapping = {}
    inputs = []
    for value in case.inputs:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            copy = value.detach().float().requires_grad_(value.requires_grad)
            mapping[id(value)] = copy
            inputs.append(copy)
        else:
            inputs.append(value)
    leaves = [mapping[id(leaf)] for leaf in case.leaves]
    return inputs, leaves, None if grads is None else tuple(g.float() for g in grads)


def check(dtype, triton_out: tuple, twin_out: tuple, reference_out: tuple | None) -> tuple[float, bool]:
    """(max |triton - twin| over the tensors, whether every tensor is within tolerance)."""
    import torch

    diff, ok = 0.0, True
    for i, (got, twin) in enumerate(zip(triton_out, twin_out)):
        d = (got.float() - twin.float()).abs().max().item()
        diff = max(diff, d)
        if dtype == torch.float32:
            ok &= d <= FP32_RTOL * max(1.0, twin.abs().max().item())
        else:
            ref = reference_out[i]
            triton_error = (got.float() - ref).abs().max().item()
            twin_error = (twin.float() - ref).abs().max().item()
            floor = torch.finfo(dtype).eps * ref.abs().max().item()
            ok &= triton_error <= max(2 * twin_error, floor)
    return diff, ok


def peak_bandwidth(device) -> float | None:
    """The GPU's peak memory bandwidth in bytes/s (double data rate x bus width), if torch says."""
    import torch

    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def do_bench(fn: Callable, args) -> float:
    """do_bench's median milliseconds of one call of FN (CUDA events, L2 flushed before each)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")


def run_case(case: Case, dtype_name: str, dtype, args, peak: float | None, synchronize: Callable) -> list[dict]:
    """The table rows (fwd, fwd+bwd) of one Case."""
    import torch

    torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no dynamic shapes
    compiled = torch.compile(case.twin, dynamic=False)
    rows = []
    twin_out = outputs(case.twin(*case.inputs))
    for pass_ in PASSES:
        grads = None if pass_ == "fwd" else tuple(torch.randn_like(out) for out in twin_out)
        impls = {
            "torch": runner(case.twin, case.inputs, case.leaves, grads),
            "compile": runner(compiled, case.inputs, case.leaves, grads),
            "triton": runner(case.triton, case.inputs, case.leaves, grads),
        }
        # The first calls (compilation and JIT) give the results to check; the interpreter's
        # timings are theirs, on CUDA do_bench times many calls after them.
        results, ms = {}, {}
        for name, fn in impls.items():
            start = time.perf_counter()
            results[name] = fn()
            synchronize()
            ms[name] = 1e3 * (time.perf_counter() - start)
        if not args.interpret:
            ms = {name: do_bench(fn, args) for name, fn in impls.items()}
        reference = None
        if dtype != torch.float32:
            ref_inputs, ref_leaves, ref_grads = upcast(case, grads)
            reference = runner(case.twin, ref_inputs, ref_leaves, ref_grads)()
        diff, ok = check(dtype, results["triton"], results["torch"], reference)
        nbytes = case.fwd_bytes + (0 if grads is None else case.bwd_bytes)
        gb_s = nbytes / (ms["triton"] * 1e-3) / 1e9
        row = {
            "kernel": case.kernel,
            "shape": case.shape,
            "dtype": dtype_name,
            "pass": pass_,
            "torch_ms": f"{ms['torch']:.3f}",
            "compile_ms": f"{ms['compile']:.3f}",
            "triton_ms": f"{ms['triton']:.3f}",
            "vs_torch": f"{ms['torch'] / ms['triton']:.2f}x",
            "vs_compile": f"{ms['compile'] / ms['triton']:.2f}x",
            "triton_gb_s": f"{gb_s:.1f}",
        }
        if peak is not None:
            row["peak_bw"] = f"{100 * gb_s * 1e9 / peak:.0f}%"
        row["max_abs_diff"] = f"{diff:.2e}"
        row["check"] = "ok" if ok else "WRONG"
        rows.append(row)
        del results, reference
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    # Triton reads TRITON_INTERPRET when it is first imported, so it is set before any import of
    # triton (torch may import it): the interpreter for --interpret, compiled kernels otherwise.
    os.environ["TRITON_INTERPRET"] = "1" if args.interpret else "0"
    if args.interpret:
        # Inductor compiles in worker processes by default; the CPU check needs no such pool.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

    import importlib.util

    import torch

    if not args.interpret and not torch.cuda.is_available():
        fail(
            "benchmarks/kernels.py needs a CUDA GPU and torch sees none "
            "(--interpret checks it on the CPU in Triton's interpreter, with meaningless timings)"
        )
    if importlib.util.find_spec("triton") is None:
        fail("benchmarks/kernels.py needs the triton package, which is not installed (pip install triton)")
    import triton

    device = torch.device("cpu" if args.interpret else "cuda")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes = INTERPRETER_SHAPES if args.interpret else SHAPES
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    peak = None if args.interpret else peak_bandwidth(device)

    torch.manual_seed(0)
    rows, errors = [], []
    for kernel in args.kernels:
        for name in args.dtypes:
            for shape in shapes[kernel]:
                # One case at a time, each printed as it ends, so that a run stopped by a time limit
                # (the GPU check's) still shows what it measured; an exception (a kernel that fails
                # to compile, say) is reported and the other cases still run.
                try:
                    case = next(iter(make_cases(kernel, [shape], dtypes[name], device)))
                    case_rows = run_case(case, name, dtypes[name], args, peak, synchronize)
                except Exception:
                    errors.append(f"{kernel} {shape} {name}")
                    print(f"ERROR in {kernel} {shape} {name}:", file=sys.stderr)
                    traceback.print_exc()
                    continue
                for row in case_rows:
                    print("  " + " ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
                rows += case_rows

    if args.interpret:
        print(
            "INTERPRETER RUN (TRITON_INTERPRET=1, on the CPU, tiny shapes, each row run once): the "
            "timings, speedups and GB/s below are meaningless; only max_abs_diff and check mean anything"
        )
        print(f"torch {torch.__version__}, triton {triton.__version__}")
    else:
        bandwidth = "" if peak is None else f", peak memory bandwidth {peak / 1e9:.0f} GB/s"
        print(
            f"{torch.cuda.get_device_name(device)}{bandwidth}; torch {torch.__version__}, triton {triton.__version__}"
        )
        print(f"ms: do_bench median ({args.warmup_ms:g} ms warm-up, {args.rep_ms:g} ms of calls, L2 flushed)")
    print_table(rows, args.csv)
    wrong = [f"{r['kernel']} {r['shape']} {r['dtype']} {r['pass']}" for r in rows if r["check"] != "ok"]
    if errors:
        print(f"ERROR: these cases raised (tracebacks above): {'; '.join(errors)}", file=sys.stderr)
        sys.exit(1)
    if wrong:
        print(f"WRONG: triton differs from its torch twin beyond tolerance in: {'; '.join(wrong)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
