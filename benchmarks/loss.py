"""Benchmark: the LM head's loss, forward+backward, with materialised fp32 logits (`impl="torch"`,
the reference) against the chunked kernel sized by its memory budget (`impl="chunked"`,
`chunk_size=None`) and, on a CUDA GPU, the Triton kernel (`impl="triton"`), for issue #20's goals.

Shapes: hidden size D = 256 (`--hidden`), vocabulary V in {32,000, 128,256} (`--vocabs`), rows
N in {8,192, 32,768} (`--rows`), fp32, no bias, mean reduction, 5% of the labels ignored. Both
the hidden states and the head's weight require gradients (as in training); a pass is
`fused_linear_cross_entropy(...)` then `.backward()`.

Each case (implementation, V, N) runs in a fresh Python process, so its peak memory is its own:
`peak_mib` is that process's peak resident set size (`ru_maxrss`, everything: Python, torch, the
inputs and the pass), and `pass_mib` the part above what the process held once its inputs were
made (peak minus that). `ms` is the best time of a pass over `--repeat` passes (3 by default)
after one untimed pass: the best, not the median, because the machine is shared and other work
only ever adds time (a pass's work is the same each time). `x_mem` is the materialised case's peak over the chunked one's (the same
V and N), `x_time` the chunked time over the materialised one. A materialised case whose fp32
logits would make its peak above `--max-gib` (13 by default; estimated as 3.1 x the logits'
bytes: measured 3.4 at 1,000 MiB of logits and 3.0 at 4,000 MiB) is skipped and says so.

`--device cuda` runs every case on the GPU instead: memory is then the CUDA caching allocator's
(`peak_mib`: `torch.cuda.max_memory_allocated`, the inputs included; `pass_mib`: that peak
minus what the inputs held), times are synchronised. The Triton columns (`tri_*`: its peak, pass
memory and time, `tri_x_mem` the materialised peak over its peak, `tri_x_time` its time over the
materialised one) need CUDA: on the CPU they say `n/a on CPU`.

Goals (issue #20): `x_mem` at least 4 at V=32,000 x 8,192 rows and at least 8 at V=128,256 x
8,192 rows, with `x_time` at most 1.15. The `goal` column says `met` or `MISSED` for those rows
(the chunked kernel's; the Triton columns are reported, not judged).

    python benchmarks/loss.py [--vocabs 32000,128256] [--rows 8192,32768] [--hidden 256]
                              [--budget-mib 64] [--repeat 3] [--max-gib 13] [--device cpu|cuda]
                              [--csv out.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

# (V, N) -> the least peak-memory ratio issue #20 asks of the chunked kernel
MEMORY_GOALS = {(32000, 8192): 4.0, (128256, 8192): 8.0}
TIME_GOAL = 1.15
# a materialised pass's peak RSS over its fp32 logits' bytes (measured: 3.4 at 1,000 MiB of
# logits, 3.0 at 4,000 MiB)
MATERIALISED_PEAK_PER_LOGIT_BYTE = 3.1


def _rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(impl: str, vocab: int, rows: int, hidden: int, budget_mib: float, repeat: int, device: str = "cpu") -> dict:
    """One case in this process: its peak memory (RSS on the CPU, the CUDA allocator's on a GPU),
    the part above its inputs, and the best time."""
    import torch

    from fgc_runtime.kernels.cross_entropy import chunk_rows, fused_linear_cross_entropy

    cuda = device == "cuda"
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (rows,), device=device)
    y[::20] = -100
    budget = int(budget_mib * 2**20)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    times = []
    for i in range(repeat + 1):
        h.grad = w.grad = None
        start = time.perf_counter()
        loss = fused_linear_cross_entropy(h, w, y, impl=impl, chunk_size=None, chunk_budget=budget)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        del loss
        if i:  # the first pass is a warm-up
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    return {
        "peak_mib": peak,
        "pass_mib": peak - base,
        "ms": min(times) * 1e3,
        "chunk_rows": chunk_rows(vocab, budget) if impl == "chunked" else None,
    }


def spawn(impl: str, vocab: int, rows: int, args: argparse.Namespace) -> dict:
    """Run one case in a fresh process (its peak RSS its own) and return its numbers."""
    cmd = [
        sys.executable, __file__, "--case", impl, str(vocab), str(rows), "--hidden", str(args.hidden),
        "--budget-mib", str(args.budget_mib), "--repeat", str(args.repeat), "--device", args.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"case {impl} V={vocab} N={rows} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the arguments; run one case (--case) or every case and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--rows", default="8192,32768")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--budget-mib", type=float, default=64.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=13.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--csv", type=Path)
    p.add_argument("--case", nargs=3, metavar=("IMPL", "V", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        impl, vocab, rows = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(impl, vocab, rows, args.hidden, args.budget_mib, args.repeat, args.device)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: torch sees no CUDA GPU", file=sys.stderr)
            sys.exit(2)
    table = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for rows in (int(n) for n in args.rows.split(",")):
            logits_gib = rows * vocab * 4 / 2**30
            chunked = spawn("chunked", vocab, rows, args)
            if logits_gib * MATERIALISED_PEAK_PER_LOGIT_BYTE > args.max_gib:
                mat = None
            else:
                mat = spawn("torch", vocab, rows, args)
            tri = spawn("triton", vocab, rows, args) if args.device == "cuda" else None
            x_mem = mat["peak_mib"] / chunked["peak_mib"] if mat else None
            x_time = chunked["ms"] / mat["ms"] if mat else None
            goal = ""
            if (vocab, rows) in MEMORY_GOALS and mat:
                met = x_mem >= MEMORY_GOALS[(vocab, rows)] and x_time <= TIME_GOAL
                goal = f"{'met' if met else 'MISSED'} (>= {MEMORY_GOALS[(vocab, rows)]:g}x mem, <= {TIME_GOAL}x time)"
            skipped = f"skipped: {logits_gib:.0f} GiB of logits, over --max-gib"
            table.append({
                "V": f"{vocab:,}",
                "N": f"{rows:,}",
                "logits_mib": f"{logits_gib * 1024:,.0f}",
                "mat_peak_mib": f"{mat['peak_mib']:,.0f}" if mat else skipped,
                "mat_pass_mib": f"{mat['pass_mib']:,.0f}" if mat else "-",
                "mat_ms": f"{mat['ms']:,.0f}" if mat else "-",
                "chunk_rows": chunked["chunk_rows"],
                "chunk_peak_mib": f"{chunked['peak_mib']:,.0f}",
                "chunk_pass_mib": f"{chunked['pass_mib']:,.0f}",
                "chunk_ms": f"{chunked['ms']:,.0f}",
                "x_mem": f"{x_mem:.2f}" if mat else "-",
                "x_time": f"{x_time:.2f}" if mat else "-",
                "goal": goal or "-",
                "tri_peak_mib": f"{tri['peak_mib']:,.0f}" if tri else "n/a on CPU",
                "tri_pass_mib": f"{tri['pass_mib']:,.0f}" if tri else "n/a on CPU",
                "tri_ms": f"{tri['ms']:,.1f}" if tri else "n/a on CPU",
                "tri_x_mem": f"{mat['peak_mib'] / tri['peak_mib']:.2f}" if tri and mat else ("-" if tri else "n/a on CPU"),
                "tri_x_time": f"{tri['ms'] / mat['ms']:.2f}" if tri and mat else ("-" if tri else "n/a on CPU"),
            })
            print(f"  done V={vocab} N={rows}", file=sys.stderr, flush=True)
    if args.device == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name()}; memory is each case's own CUDA allocator peak"
    else:
        where = f"{os.cpu_count()} CPU(s); memory is each case's own process peak RSS"
    print(f"fp32, hidden {args.hidden}, chunk budget {args.budget_mib:g} MiB, best of {args.repeat} passes, {where}")
    print_table(table, args.csv)


if __name__ == "__main__":
    main()
