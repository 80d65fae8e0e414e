"""Benchmark: tokens/s of the generated trainer against a plain training loop over transformers'
LlamaForCausalLM of the same shape, in one process, with the same batch, optimizer and threads, in
three precisions.

Two shapes: `example` (the main example's defaults: hidden 96, 3 layers, T 128, batch 16) and
`h256` (hidden 256, 4 layers, T 256, batch 8). For each shape and each precision of `--precisions`
(`fp32`, `bf16-mixed`: fp32 weights under bf16 autocast, `bf16`: bf16 weights with fp32 optimizer
state, each update written back with stochastic rounding, `-D bf16_stochastic_round=true`, which
makes the optimizer `fgc_runtime.optim.AdamW`), the rows:
- `fgc train.py`: the generated trainer itself (basic, one process, built with `-D precision=P`):
  its `main()` runs 2 x STEPS steps logging every STEPS; the second record's tokens_per_s is the
  steady-state rate (batch sampling, loss, clipping, optimizer and scheduler steps included);
- `fgc train.py, compile`: the same config built with `-D compile=true` (each decoder layer
  compiled by torch.compile; the warm-up steps include the compilation);
- `fgc train.py, compile, fused AdamW`: that, and `-D fused_optimizer=true` (torch's fused AdamW
  step instead of its foreach one; in bf16, `fgc_runtime.optim.AdamW`'s step compiled as one
  function instead of its step parameter by parameter);
and once per shape, the baselines:
- `fgc model, plain loop` (fp32): the generated model in the same plain loop as the Hugging Face
  one (tells the trainer's overhead from the model's speed);
- `HF Llama, plain loop` (fp32): `LlamaForCausalLM` (sdpa attention), `model(ids, labels=ids).loss`,
  `clip_grad_norm_`, AdamW, over the same batches, in a process of its own (below);
- `HF Llama, plain loop, autocast`: the same loop with the forward and the loss under
  `torch.autocast("cpu", torch.bfloat16)` (fp32 weights and optimizer), in that process too;
- `HF Llama, plain loop, fgc's malloc` and `..., autocast, fgc's malloc`: the same two loops in this
  process.
The generated trainer keeps freed host memory in its process (glibc's malloc options,
`fgc_runtime.host_memory`), for good: its first row would change the malloc of every loop after
it. So this process keeps it from the start, for every row (the line saying so is printed first),
and the two HF loops also run in a child process whose malloc is as it starts (glibc's defaults
unless the environment sets them), the way a user's own script runs, one child a round (after
that round's turns of the other rows, or before them in a reversed round, below):
`vs_hf` and `vs_hf_autocast` are over those two, and the goal lines also give each ratio over the
loop with fgc's malloc.
and, for each peer that is installed (benchmarks/_peers.py; `--no-peers` leaves them out), in fp32 and
bf16-mixed (neither peer has fgc's bf16, bf16 weights with fp32 optimizer state), each model starting from the
HF model's weights:
- `torchtitan Llama3 (SDPA), train_step`: torchtitan's Llama3Model of the shape (its SDPA inner attention)
  stepped as its `Trainer.train_step` does (chunked cross-entropy loss, its clip, AdamW, its lr scheduler);
  `..., apply_compile`: with its per-block compile (and compiled loss);
- `LitGPT GPT, pretrain step`: `litgpt.model.GPT` of a Llama `litgpt.Config`, stepped as `litgpt/pretrain.py`'s
  `fit()` does (`chunked_cross_entropy`, clip, AdamW), without Fabric; `..., torch.compile(model)`: compiled as
  its `setup()` does.
The peers use the HF loop's AdamW and, in bf16-mixed, its autocast around the forward and the loss. Before
timing, the first model of each peer is checked against the HF model with the same weights: their fp32
first-batch losses must agree to 1e-4 (printed under the shape's line).
`vs_hf` is each rate over the fp32 HF loop, `vs_hf_autocast` over the autocast one (those of their own process).
The peers run in this process, with fgc's malloc.

The loops take turns for ROUNDS rounds, every other round in the reverse order, and each row
shows its best rate, so that a machine busy with other work disturbs the comparison less. A
goal's ratio is the median over the rounds of the two loops' ratio within a round (this
machine's speed drifts by 10% over seconds and more from one process to the next; two turns of
one round are closer in time than two loops' best turns), the best over best beside it. Also
prints the CPU's measured fp32 and bf16 matmul FLOP/s (a square matmul) and each row's share of
the one of its precision (tokens/s x FLOPs per token, 6N + 12LHT).

The second table splits one fp32 step of each plain loop (torch's profiler, self time): the matmul
kernels, the attention kernels and everything else; with bf16-mixed among the precisions, also
one step of each under `torch.autocast(bf16)`. `bound_vs_hf` is the HF step time (of the HF loop
of the same precision) over the generated model's matmul and attention time: the most any
trainer running the same kernels could reach against that HF loop, if everything else took no
time at all. A warning follows the table for each split whose kernels took longer under the
profiler than its whole step without it: the machine's speed changed between the two.

The last lines state issue #18's goals and whether this run meets them, with each round's ratio:
fp32 at least 1.15x the HF loop; bf16-mixed at least 1.3x the HF autocast loop and 2x the fp32 HF
loop; bf16 at least the bf16-mixed rate; and, for each peer run, that the best fgc train.py row
of each shape and precision is ahead of the peer's best row. The last line names the peers,
installed and measured or not installed.

    python benchmarks/trainer.py [--shapes example,h256] [--precisions fp32,bf16-mixed,bf16]
                                 [--threads N] [--steps N] [--rounds N] [--no-compile] [--no-peers] [--csv out.csv]
"""

from __future__ import annotations

import os

# Inductor compiles in worker processes by default; on a small machine they would compete with
# the loops being timed.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _table import ROUNDS, print_table, round_ratio, shape_names
import _peers
# last: _loops leaves sys.path
from _loops import EXAMPLE_SHAPE, H256_SHAPE, LR, hf_llama, import_train_module, plain_loop, steady_record

import torch

from fgc.build import build_package, compile_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
SHAPES = {
    "example": EXAMPLE_SHAPE,
    "h256": H256_SHAPE,
}
# The kernels of the split table, by the profiler's names (self time).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"
# The 1-minute load average, sampled as the loops run: a busy machine makes the rates unreliable.
load_samples: list[float] = []


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in DTYPE on this CPU (best of 3 runs of REPS)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def run_generated_trainer(train, package: Path, steps: int) -> float:
    """Steady-state tokens/s of the trainer's own main(): the rate of its second log interval."""
    return steady_record(train, steps)["tokens_per_s"]



def split_warnings(split_rows: list[dict]) -> list[str]:
    """A warning for each split whose profiled matmul and attention kernels took longer than the
    step they are part of, timed just before without the profiler: only a machine whose speed
    changed between the two measurements gives that, and then the split and its bound mean little."""
    return [
        f"WARNING: {r['shape']}, {r['loop']}: its matmul and attention kernels took "
        f"{r['matmul_ms'] + r['attention_ms']:.1f} ms under the profiler, more than its whole step "
        f"({r['step_ms']:.1f} ms): the machine's speed changed during the run, so this split and its "
        "bound are not reliable"
        for r in split_rows
        if r["matmul_ms"] + r["attention_ms"] > r["step_ms"]
    ]


def kernel_split(run, steps: int, tokens_per_step: int) -> dict:
    """Milliseconds per step in matmul kernels, attention kernels and everything else.

    The kernels' self time under torch's profiler over STEPS steps of RUN; "other" is the rest
    of the step's wall time measured without the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    step_ms = min(1e3 * tokens_per_step / run(steps) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    matmul_us = attention_us = 0.0
    for event in prof.key_averages():
        if event.key in MATMUL_OPS:
            matmul_us += event.self_cpu_time_total
        elif event.key.startswith(ATTENTION_PREFIX):
            attention_us += event.self_cpu_time_total
    matmul_ms, attention_ms = matmul_us / 1e3 / steps, attention_us / 1e3 / steps
    return {
        "step_ms": step_ms,
        "matmul_ms": matmul_ms,
        "attention_ms": attention_ms,
        "other_ms": max(step_ms - matmul_ms - attention_ms, 0.0),
    }



PRECISIONS = ("fp32", "bf16-mixed", "bf16")
# the generated trainer's rows: the config's -D values on top of the shape's
LOOPS = (
    ("fgc train.py", {}),
    ("fgc train.py, compile", {"compile": True}),
    ("fgc train.py, compile, fused AdamW", {"compile": True, "fused_optimizer": True}),
)
# the config's -D values of a precision beyond `precision` itself: bf16 as issue #18 defines it
PRECISION_VARIABLES = {"bf16": {"bf16_stochastic_round": True}}
# the dtype whose matmul rate a row of each precision is compared with
PEAK_DTYPE = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}
HF_FP32, HF_AUTOCAST, FGC_PLAIN = "HF Llama, plain loop", "HF Llama, plain loop, autocast", "fgc model, plain loop"
FGC_AUTOCAST = "fgc model, plain loop, autocast"
# the two HF loops in this process, whose malloc keeps freed memory as the generated trainer's does
HF_FP32_KEPT, HF_AUTOCAST_KEPT = f"{HF_FP32}, fgc's malloc", f"{HF_AUTOCAST}, fgc's malloc"


def batch_sampler(package: Path, shape: dict):
    """The benchmark's batches of SHAPE: the package's training split, seed 0 (its fgc_runtime)."""
    from fgc_runtime import data

    shard = data.TokenShard.open(package / "data", "train")
    return data.BatchSampler(shard, seq_len=shape["seq_len"], global_batch_size=shape["batch_size"], seed=0)


def hf_loops(hf_model, hf_autocast_model, batches, steps: int):
    """The plain loops of the two HF models: the first in fp32, the second under bf16 autocast."""
    hf_loop = plain_loop(hf_model, batches, steps, hf=True)
    return hf_loop, plain_loop(hf_autocast_model, batches, steps, hf=True, autocast_dtype=torch.bfloat16)


def own_process_rates(name: str, package: Path, args) -> dict:
    """The two HF loops' rates of shape NAME ((precision, row) -> tokens/s), one turn each in a
    child process whose malloc is as it starts (this one keeps freed memory: fgc's malloc), over
    the batches of PACKAGE."""
    flags = ["--shapes", name, "--threads", str(args.threads), "--steps", str(args.steps), "--rounds", "1"]
    flags += ["--own-process-baselines", str(package)]
    run = subprocess.run(
        [sys.executable, __file__, *flags], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"the HF loops' own process failed:\n{run.stderr[-3000:]}")
    rates = json.loads(run.stdout.splitlines()[-1])
    return {("fp32", HF_FP32): rates["fp32"], ("bf16-mixed", HF_AUTOCAST): rates["bf16-mixed"]}


def own_process_baselines(name: str, package: Path, args) -> dict:
    """In the child process of own_process_rates: the two HF loops of shape NAME, ROUNDS turns
    each, and their best rates by precision, over the batches of the generated PACKAGE."""
    shape = SHAPES[name]
    train = import_train_module(package)  # and its fgc_runtime, which batch_sampler imports
    sampler = batch_sampler(package, shape)
    torch.manual_seed(0)
    vocab = train.build_model(device="meta").vocab_size
    hf_loop, hf_autocast_loop = hf_loops(hf_llama(shape, vocab), hf_llama(shape, vocab), sampler.batch, args.steps)
    rates = {"fp32": 0.0, "bf16-mixed": 0.0}
    for _ in range(args.rounds):
        rates["fp32"] = max(rates["fp32"], hf_loop(args.steps))
        rates["bf16-mixed"] = max(rates["bf16-mixed"], hf_autocast_loop(args.steps))
    return rates


# round_order's place for the turn of the HF loops' own process
OWN_PROCESS = "the HF loops' own process"


def round_order(keys: list, turn: int) -> list:
    """The order of round TURN (from 0): KEYS, then the HF loops' own process (OWN_PROCESS); every
    other round reversed, so that a machine speeding up or slowing down over a round favours no
    loop in the rounds' ratios."""
    order = [*keys, OWN_PROCESS]
    return order[::-1] if turn % 2 else order


def measure_shape(name: str, shape: dict, args, tmp: Path) -> tuple[list[dict], list[dict], str]:
    """The rate rows and the split rows of one shape, and a line describing it."""
    trainers = {}  # (precision, loop) -> (train module, package)
    for precision in args.precisions:
        variables = dict(shape, trainer_type="basic", precision=precision, lr=LR, max_steps=2 * args.steps)
        variables.update(PRECISION_VARIABLES.get(precision, {}))
        for i, (loop, extra) in enumerate(LOOPS):
            if extra.get("compile") and not args.compile:
                continue
            package = tmp / f"{name}_{precision}_{i}"
            build_package(compile_config(EXAMPLE, variables=dict(variables, **extra)), package)
            trainers[precision, loop] = (import_train_module(package), package)
    train, package = next(iter(trainers.values()))
    from fgc_runtime.train import model_flops_per_token

    sampler = batch_sampler(package, shape)
    tokens_per_step = shape["seq_len"] * shape["batch_size"]

    torch.manual_seed(0)
    fgc_model = train.build_model()
    vocab = fgc_model.vocab_size
    hf_model = hf_llama(shape, vocab)
    hf_autocast_model = hf_llama(shape, vocab)
    peer_loops, checks = peer_runs(shape, vocab, hf_model, sampler.batch, args)
    n_fgc = sum(p.numel() for p in fgc_model.parameters())
    n_hf = sum(p.numel() for p in hf_model.parameters())
    assert n_fgc == n_hf, f"the two models differ in size: {n_fgc} vs {n_hf}"
    flops_per_token = model_flops_per_token(n_fgc, shape["num_hidden_layers"], shape["hidden_size"], shape["seq_len"])

    loops = {
        key: (lambda t=t, pkg=pkg: run_generated_trainer(t, pkg, args.steps)) for key, (t, pkg) in trainers.items()
    }
    fgc_loop = plain_loop(fgc_model, sampler.batch, args.steps, hf=False)
    hf_loop, hf_autocast_loop = hf_loops(hf_model, hf_autocast_model, sampler.batch, args.steps)
    loops["fp32", FGC_PLAIN] = lambda: fgc_loop(args.steps)
    loops["fp32", HF_FP32_KEPT] = lambda: hf_loop(args.steps)
    loops["bf16-mixed", HF_AUTOCAST_KEPT] = lambda: hf_autocast_loop(args.steps)
    loops.update(peer_loops)
    history = {key: [] for key in loops}  # each loop's rate in each round
    peaks = {torch.float32: 0.0, torch.bfloat16: 0.0}

    def own_process_turn():
        # a turn of the HF loops in their own process, beside this round's turns of the rest
        for key, rate in own_process_rates(name, package, args).items():
            history.setdefault(key, []).append(rate)
        load_samples.append(os.getloadavg()[0])

    for turn in range(args.rounds):
        for dtype in peaks:  # measured between the loops, best of the rounds too
            peaks[dtype] = max(peaks[dtype], matmul_flops(dtype))
        for key in round_order(list(loops), turn):
            if key is OWN_PROCESS:
                own_process_turn()
            else:
                history[key].append(loops[key]())
                load_samples.append(os.getloadavg()[0])
    rates = {key: max(turns) for key, turns in history.items()}
    hf_rate, hf_autocast_rate = rates["fp32", HF_FP32], rates["bf16-mixed", HF_AUTOCAST]
    rate_rows = [
        {
            "shape": name,
            "precision": precision,
            "loop": loop,
            "tokens_per_s": round(rate),
            "vs_hf": round(rate / hf_rate, 2),
            "vs_hf_autocast": round(rate / hf_autocast_rate, 2),
            "gflop_per_s": round(rate * flops_per_token / 1e9, 1),
            "share_of_matmul": f"{100 * rate * flops_per_token / peaks[PEAK_DTYPE[precision]]:.1f}%",
            ROUNDS: history[precision, loop],
        }
        for (precision, loop), rate in sorted(rates.items(), key=lambda kv: PRECISIONS.index(kv[0][0]))
    ]
    # (precision, loop) -> its split; each fgc loop's bound is against the HF loop of its precision
    splits = {("fp32", FGC_PLAIN): kernel_split(fgc_loop, args.steps, tokens_per_step),
              ("fp32", HF_FP32_KEPT): kernel_split(hf_loop, args.steps, tokens_per_step)}
    if "bf16-mixed" in args.precisions:
        torch.manual_seed(0)
        fgc_autocast_loop = plain_loop(
            train.build_model(), sampler.batch, args.steps, hf=False, autocast_dtype=torch.bfloat16
        )
        splits["bf16-mixed", FGC_AUTOCAST] = kernel_split(fgc_autocast_loop, args.steps, tokens_per_step)
        splits["bf16-mixed", HF_AUTOCAST_KEPT] = kernel_split(hf_autocast_loop, args.steps, tokens_per_step)
    hf_of = {"fp32": HF_FP32_KEPT, "bf16-mixed": HF_AUTOCAST_KEPT}
    split_rows = [
        {"shape": name, "precision": precision, "loop": row}
        | {key: round(value, 1) for key, value in split.items()}
        | {"bound_vs_hf": round(
            splits[precision, hf_of[precision]]["step_ms"] / (split["matmul_ms"] + split["attention_ms"]), 2
        )}
        for (precision, row), split in splits.items()
    ]
    dims = " ".join(f"{k}={v}" for k, v in shape.items())
    line = (
        f"{name}: {dims}, vocab {vocab}, {n_fgc:,} parameters, {flops_per_token:,.0f} FLOPs/token; measured "
        f"matmul (1024 x 1024 x 1024) fp32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s"
    )
    for peer, diff in checks.items():
        line += f"\n{name}: same model? {peer} loaded with the HF Llama's weights, fp32 first-batch loss - HF's: {diff}"
    return rate_rows, split_rows, line


# the peers run in these precisions (neither has fgc's bf16: bf16 weights with fp32 optimizer state)
PEER_PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}
# the most a peer's fp32 first-batch loss may differ from HF's with the same weights
SAME_MODEL_TOLERANCE = 1e-4


def peer_runs(shape: dict, vocab: int, hf_model, batches, args) -> tuple[dict, dict]:
    """The installed peers' loops of SHAPE ((precision, row) -> run), and each peer's same-model check.

    Every peer model starts from HF_MODEL's weights (not yet trained); the check compares the first of them with
    HF_MODEL on batch 0 in fp32 and stops the run when they differ by more than SAME_MODEL_TOLERANCE.
    """
    loops, checks = {}, {}
    for peer in args.peers:
        build, _, _, make_loop = _peers.BUILD[peer]
        for precision, autocast_dtype in PEER_PRECISIONS.items():
            if precision not in args.precisions:
                continue
            for compile in (False, True) if args.compile else (False,):
                model = build(shape, vocab)
                if peer not in checks:
                    ids, labels = batches(0)
                    checks[peer] = diff = _peers.same_model_check(peer, model, hf_model, ids, labels)
                    assert diff <= SAME_MODEL_TOLERANCE, f"{peer}'s model is not the HF model: loss differs by {diff}"
                else:
                    model.load_state_dict(_peers.BUILD[peer][1](model, hf_model.state_dict()), strict=False)
                run = make_loop(model, batches, args.steps, autocast_dtype=autocast_dtype, compile=compile)
                loops[precision, _peers.ROW[peer][compile]] = lambda run=run: run(args.steps)
    return loops, checks


def goal_lines(name: str, rows: list[dict]) -> list[str]:
    """Issue #18's goals for shape NAME, each with this run's ratio and whether it is met.

    Each goal compares the generated trainer's fastest row of a precision (best rate) with a
    baseline row; the ratio judged is their rounds' median ratio (`round_ratio`), with the best
    over best alongside."""
    here = {(row["precision"], row["loop"]): row for row in rows if row["shape"] == name}
    best = {}  # precision -> the row of the fastest generated trainer
    for (precision, loop), row in here.items():
        if loop.startswith("fgc train.py"):
            if precision not in best or row["tokens_per_s"] > best[precision]["tokens_per_s"]:
                best[precision] = row

    def verdict(row: dict, baseline: dict, goal: float, kept: dict | None = None) -> str:
        ratio, how = round_ratio(row, baseline)
        # judged as printed, to two decimals
        line = f"{ratio:.2f}x, {how} (goal: {goal}x) -> {'met' if round(ratio, 2) >= goal else 'NOT met'}"
        if kept is not None:
            # the HF loop with the generated trainer's malloc (this process's), where the rows have it
            line += f"; {round_ratio(row, kept)[0]:.2f}x that loop with fgc's malloc"
        return line

    hf, hf_kept = here.get(("fp32", HF_FP32)), here.get(("fp32", HF_FP32_KEPT))
    autocast, autocast_kept = here.get(("bf16-mixed", HF_AUTOCAST)), here.get(("bf16-mixed", HF_AUTOCAST_KEPT))
    lines = []
    if "fp32" in best and hf:
        row = best["fp32"]
        lines.append(f"{name}: fp32, {row['loop']} / HF loop: {verdict(row, hf, 1.15, hf_kept)}")
    if "bf16-mixed" in best:
        row = best["bf16-mixed"]
        if autocast:
            lines.append(
                f"{name}: bf16-mixed, {row['loop']} / HF autocast loop: {verdict(row, autocast, 1.3, autocast_kept)}"
            )
        if hf:
            lines.append(f"{name}: bf16-mixed, {row['loop']} / fp32 HF loop: {verdict(row, hf, 2.0, hf_kept)}")
    if "bf16" in best and "bf16-mixed" in best:
        row = best["bf16"]
        lines.append(f"{name}: bf16, {row['loop']} / the best bf16-mixed trainer: {verdict(row, best['bf16-mixed'], 1.0)}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="example,h256", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {', '.join(PRECISIONS)}"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps, then as many timed")
    parser.add_argument(
        "--rounds", type=int, default=5, help="turns of every loop: its best rate, the goals' rounds' median ratio"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled trainer")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="leave out the installed peers")
    parser.add_argument("--csv", type=Path, help="the rate table as CSV")
    # the child process of own_process_rates: prints the HF loops' rates of the one shape as JSON
    parser.add_argument("--own-process-baselines", type=Path, metavar="PACKAGE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = shape_names(parser, args.shapes, SHAPES)
    args.precisions = args.precisions.split(",")
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {unknown[0]!r}: expected one of {', '.join(PRECISIONS)}")
    torch.set_num_threads(args.threads)
    if args.own_process_baselines:
        print(json.dumps(own_process_baselines(names[0], args.own_process_baselines, args)))
        return
    from fgc_runtime.host_memory import keep_freed_memory

    # the generated trainer's malloc, for every row of this process (the module docstring)
    malloc_line = keep_freed_memory()
    args.peers = [peer for peer in _peers.PEERS if args.peers and _peers.installed(peer)]

    rate_rows, split_rows, lines = [], [], []
    load_samples.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rates, splits, line = measure_shape(name, SHAPES[name], args, Path(tmp))
            rate_rows += rates
            split_rows += splits
            lines.append(line)
    print(f"{args.threads} threads, torch {torch.__version__}")
    print(f"this process, every row but {HF_FP32!r} and {HF_AUTOCAST!r} (a process of their own): {malloc_line}")
    load = max(load_samples)
    if load > args.threads + 0.5:
        print(
            f"WARNING: the machine was busy (load average {load:.1f} for {args.threads} threads): "
            "the rates below are not reliable; run again on a quiet machine"
        )
    for line in lines:
        print(line)
    print_table(rate_rows, args.csv)
    print()
    print("one step of each plain loop, in ms (matmul and attention: kernel self time under the profiler)")
    print_table(split_rows)
    for warning in split_warnings(split_rows):
        print(warning)
    print()
    for name in names:
        bound = next(r["bound_vs_hf"] for r in split_rows if r["shape"] == name and r["loop"] == FGC_PLAIN)
        print(f"{name}: bound in fp32 with these kernels (everything but matmul and attention free): {bound:.2f}x")
        for r in split_rows:
            if r["shape"] == name and r["loop"] == FGC_AUTOCAST:
                print(
                    f"{name}: bound in bf16-mixed against the HF autocast loop, with the same kernels under autocast: "
                    f"{r['bound_vs_hf']:.2f}x"
                )
        for line in goal_lines(name, rate_rows) + _peers.goal_ratio_lines(name, rate_rows, args.peers):
            print(line)
    print(_peers.peer_line(dict.fromkeys(args.peers, True)))

if __name__ == "__main__":
    main()
