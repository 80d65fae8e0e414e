"""Benchmark: tokens/s of the generated trainer against a plain training loop over transformers'
LlamaForCausalLM of the same shape, in one process, with the same batch, optimizer and threads.

Rows:
- `fgc train.py`: the generated trainer itself (basic, fp32, one process): its `main()` runs
  2 x STEPS steps logging every STEPS; the second record's tokens_per_s is the steady-state rate
  (batch sampling, loss, clipping, optimizer and scheduler steps included);
- `fgc train.py, compile`: the same config built with `-D compile=true` (each decoder layer
  compiled by torch.compile; the warm-up steps include the compilation), with `--compile`;
- `fgc model, plain loop`: the generated model in the same plain loop as the Hugging Face one
  (tells the trainer's overhead from the model's speed);
- `HF Llama, plain loop`: `LlamaForCausalLM` (sdpa attention), `model(ids, labels=ids).loss`,
  `clip_grad_norm_`, AdamW, over the same batches.

The loops take turns for ROUNDS rounds and each row keeps its best rate, so that a machine busy
with other work disturbs the comparison less. Also prints the CPU's measured fp32 matmul FLOP/s (a square matmul) and each row's share of it
(tokens/s x FLOPs per token, 6N + 12LHT). Goal: the generated trainer at least 1.3x the HF loop.

    python benchmarks/trainer.py [--threads N] [--steps N] [--rounds N] [--compile] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from _table import print_table

import torch
import torch.nn.functional as F

from fgc.build import build_package, compile_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
    "seq_len": 256,
    "batch_size": 8,
}
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.1


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    """fp32 FLOP/s of an n x n matmul on this CPU (best of 3 runs of REPS)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def import_train_module(package: Path):
    """The generated train.py as a module (its model.py and fgc_runtime/ beside it)."""
    sys.path.insert(0, str(package))
    spec = importlib.util.spec_from_file_location("fgc_generated_train", package / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_generated_trainer(train, package: Path, steps: int) -> float:
    """Steady-state tokens/s of the trainer's own main(): the rate of its second log interval."""
    with tempfile.TemporaryDirectory() as out:
        flags = ["--output-dir", out, "--device", "cpu", "--resume", "never", "--eval-every", "0"]
        with contextlib.redirect_stdout(io.StringIO()):  # its own log lines
            train.main(flags + ["--max-steps", str(2 * steps), "--log-every", str(steps)])
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["tokens_per_s"]


def plain_loop(model, batches, steps: int, hf: bool) -> float:
    """tokens/s of a plain loop (forward, loss, backward, clip, AdamW) after STEPS warm-up steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    model.train()

    def step(i):
        ids, labels = batches(i)
        if hf:  # the usual way: the model shifts the labels itself (T - 1 targets a row)
            loss = model(input_ids=ids, labels=ids).loss
        else:
            logits = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(steps):
        step(i)
    start = time.perf_counter()
    for i in range(steps, 2 * steps):
        step(i)
    elapsed = time.perf_counter() - start
    ids, _ = batches(0)
    return steps * ids.numel() / elapsed


def hf_llama(shape: dict, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=shape["seq_len"],
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps, then as many timed")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every loop; the best rate counts")
    parser.add_argument("--compile", action="store_true", help="also a trainer built with -D compile=true")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    variables = dict(SHAPE, trainer_type="basic", precision="fp32", lr=LR, max_steps=2 * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pkg"
        build_package(compile_config(EXAMPLE, variables=variables), package)
        train = import_train_module(package)
        from fgc_runtime import data
        from fgc_runtime.train import model_flops_per_token

        shard = data.TokenShard.open(package / "data", "train")
        sampler = data.BatchSampler(
            shard, seq_len=SHAPE["seq_len"], global_batch_size=SHAPE["batch_size"], seed=0
        )

        torch.manual_seed(0)
        fgc_model = train.build_model()
        vocab = fgc_model.vocab_size
        hf_model = hf_llama(SHAPE, vocab)
        n_fgc = sum(p.numel() for p in fgc_model.parameters())
        n_hf = sum(p.numel() for p in hf_model.parameters())
        assert n_fgc == n_hf, f"the two models differ in size: {n_fgc} vs {n_hf}"
        flops_per_token = model_flops_per_token(n_fgc, SHAPE["num_hidden_layers"], SHAPE["hidden_size"], SHAPE["seq_len"])

        loops = {"fgc train.py": lambda: run_generated_trainer(train, package, args.steps)}
        if args.compile:
            compiled_package = Path(tmp) / "pkg_compile"
            build_package(compile_config(EXAMPLE, variables=dict(variables, compile=True)), compiled_package)
            sys.path.remove(str(package))
            for name in ("model", "fgc_generated_train"):
                sys.modules.pop(name, None)
            compiled_train = import_train_module(compiled_package)
            loops["fgc train.py, compile"] = lambda: run_generated_trainer(compiled_train, compiled_package, args.steps)
        loops["fgc model, plain loop"] = lambda: plain_loop(fgc_model, sampler.batch, args.steps, hf=False)
        loops["HF Llama, plain loop"] = lambda: plain_loop(hf_model, sampler.batch, args.steps, hf=True)
        rates = {name: 0.0 for name in loops}
        peak = 0.0
        for _ in range(args.rounds):
            peak = max(peak, matmul_flops())  # measured between the loops, best of the rounds too
            for name, loop in loops.items():
                rates[name] = max(rates[name], loop())
    hf_rate = rates["HF Llama, plain loop"]
    rows = [
        {
            "loop": name,
            "tokens_per_s": round(rate),
            "vs_hf": round(rate / hf_rate, 2),
            "gflop_per_s": round(rate * flops_per_token / 1e9, 1),
            "share_of_matmul": f"{100 * rate * flops_per_token / peak:.1f}%",
        }
        for name, rate in rates.items()
    ]
    shape = " ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(f"shape: {shape}, vocab {vocab}, {n_fgc:,} parameters, {flops_per_token:,.0f} FLOPs/token; "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s (1024 x 1024 x 1024)")
    print_table(rows, args.csv)
    ratio = rates["fgc train.py"] / hf_rate
    print(f"generated trainer / HF loop: {ratio:.2f}x (goal: 1.3x) -> {'met' if ratio >= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
