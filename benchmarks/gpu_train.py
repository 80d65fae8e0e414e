"""Benchmark: the main example scaled to about 100M parameters, trained in bf16 on one CUDA GPU by
the generated trainer, against a transformers loop of the same shape under torch.autocast(bf16).

Two steps, because the GPU machine need not have fgc installed (a generated package needs only
torch):

    python benchmarks/gpu_train.py prepare DIR [--shape NAME] [--variants fgc,compile,triton]
    python benchmarks/gpu_train.py run DIR [--steps N] [--device cuda|cpu] [--csv out.csv]

`prepare` (where fgc is installed) builds examples/tiny_llama/train.yaml at the shape into one
package per variant, under DIR, and writes DIR/benchmark.json (the shape and the variants);
`run` (on the GPU) trains them and the transformers loop. The variants, each with the basic
trainer, at `precision=bf16-mixed` (fp32 weights and optimizer state, bf16 autocast) unless said:
- `fgc`: kernels `auto` (on CUDA: the torch twins);
- `compile`: `-D compile=true` (each decoder layer compiled by torch.compile);
- `triton`: `-D kernel_impl=triton` (fgc_runtime's Triton rms_norm, swiglu and rope);
- `fp32` and `fp32-triton`: `fgc` and `triton` at `precision=fp32` (TF32 matmuls off, torch's
  default), whose losses agree to fp32's precision where the kernels are right (not a default:
  `--variants` names them).

Rows: each package's own `train.py` `main()` for 2 x STEPS steps, logging every STEPS steps (the
second interval's tokens/s is the steady state: batch sampling, loss, clipping, optimizer and
scheduler steps included; compilation falls in the first); then `HF Llama, autocast bf16`:
transformers' LlamaForCausalLM (sdpa attention), fp32 weights, forward and loss under
`torch.autocast(bf16)`, `clip_grad_norm_`, AdamW, over the same batches, timed over STEPS steps
after STEPS warm-up steps. `vs_hf` is a row's tokens/s over the HF loop's; `mfu` is tokens/s x
FLOPs per token (6N + 12LHT) over the GPU's dense bf16 peak from its datasheet
(`fgc_runtime.train.PEAK_FLOPS`), `of_matmul` the same over the measured rate of an
8192 x 8192 x 8192 bf16 matmul. `loss` is each fgc run's loss at its last step (the variants start
from the same seed and data, so they should agree to bf16's precision).

Shapes: `100m` (hidden 768, 16 layers, 12 heads, 4 key/value heads, intermediate 2048, byte
vocabulary of 257, sequence 1024, batch 32: 101M parameters) and `tiny` (the main example's
defaults, to check the script on a CPU: `run DIR --device cpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402
# noqa below: E402; last: _loops leaves sys.path
from _loops import EXAMPLE_SHAPE, hf_llama, import_train_module, plain_loop, steady_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
SHAPES = {
    "100m": {
        "hidden_size": 768,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2048,
        "seq_len": 1024,
        "batch_size": 32,
    },
    "tiny": EXAMPLE_SHAPE,
}
VARIANTS = {
    "fgc": {},
    "compile": {"compile": True},
    "triton": {"kernel_impl": "triton"},
    "fp32": {"precision": "fp32"},
    "fp32-triton": {"precision": "fp32", "kernel_impl": "triton"},
}
HF_ROW = "HF Llama, autocast bf16"


def prepare(directory: Path, shape_name: str, variants: list[str]) -> None:
    from fgc.build import build_package, compile_config

    shape = SHAPES[shape_name]
    directory.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        variables = dict(shape, trainer_type="basic", precision="bf16-mixed", eval_every=0) | VARIANTS[variant]
        build_package(compile_config(EXAMPLE, variables=variables), directory / variant)
        print(f"built {directory / variant}")
    (directory / "benchmark.json").write_text(json.dumps({"shape": shape_name, "variants": variants}, indent=1))


def train_package(package: Path, device: str, steps: int) -> dict:
    """The steady-state record (tokens/s, mfu, loss) of the package's own main()."""
    return steady_record(import_train_module(package), steps, device)


def matmul_rate(device, n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of an n x n x n matmul on DEVICE (after 3 warm-ups)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def run(directory: Path, device: str, steps: int, csv: Path | None) -> None:
    import torch

    meta = json.loads((directory / "benchmark.json").read_text())
    shape = SHAPES[meta["shape"]]
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --device cpu to check the script)", file=sys.stderr)
        sys.exit(2)
    rows, records = [], {}
    for variant in meta["variants"]:
        records[variant] = train_package(directory / variant, device, steps)
        print(f"trained {variant}: {records[variant]['tokens_per_s']:,.0f} tokens/s", flush=True)

    # The HF loop, over the batches of the last package's data (the same text in every package).
    from fgc_runtime import data
    from fgc_runtime.train import device_name, model_flops_per_token, peak_flops

    train = import_train_module(directory / meta["variants"][-1])
    shard = data.TokenShard.open(directory / meta["variants"][-1] / "data", "train")
    sampler = data.BatchSampler(shard, seq_len=shape["seq_len"], global_batch_size=shape["batch_size"], seed=0)
    torch.manual_seed(0)
    fgc_model = train.build_model()
    vocab = fgc_model.vocab_size
    n_params = sum(p.numel() for p in fgc_model.parameters())
    del fgc_model
    hf_model = hf_llama(shape, vocab).to(device)
    n_hf = sum(p.numel() for p in hf_model.parameters())
    assert n_hf == n_params, f"the two models differ in size: {n_params} vs {n_hf}"
    hf_loop = plain_loop(hf_model, sampler.batch, steps, hf=True, device=device, autocast_dtype=torch.bfloat16)
    hf_rate = hf_loop(steps)
    del hf_model, hf_loop

    flops_per_token = model_flops_per_token(n_params, shape["num_hidden_layers"], shape["hidden_size"], shape["seq_len"])
    name = device_name(torch.device(device))
    peak = peak_flops(name, "bf16")
    measured = matmul_rate(device) if device == "cuda" else None
    rates = {f"fgc {v}" if v != "fgc" else "fgc": records[v]["tokens_per_s"] for v in meta["variants"]}
    rates[HF_ROW] = hf_rate
    losses = {f"fgc {v}" if v != "fgc" else "fgc": records[v].get("loss") for v in meta["variants"]}
    for row, rate in rates.items():
        achieved = rate * flops_per_token
        rows.append(
            {
                "loop": row,
                "tokens_per_s": round(rate),
                "vs_hf": round(rate / hf_rate, 2),
                "mfu": f"{100 * achieved / peak:.1f}%" if peak else "-",
                "of_matmul": f"{100 * achieved / measured:.1f}%" if measured else "-",
                "loss": f"{losses[row]:.6f}" if losses.get(row) is not None else "-",
            }
        )
    dims = " ".join(f"{k}={v}" for k, v in shape.items())
    print(f"{name}, torch {torch.__version__}; {meta['shape']}: {dims}, vocab {vocab}, {n_params:,} parameters,")
    print(
        f"{flops_per_token:,.0f} FLOPs/token; bf16-mixed; {steps} timed steps"
        + (f"; measured bf16 matmul {measured / 1e12:.0f} TFLOP/s" if measured else "")
        + (f"; datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    print_table(rows, csv)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="build the packages (needs fgc)")
    p.add_argument("directory", type=Path)
    p.add_argument("--shape", default="100m", choices=sorted(SHAPES))
    p.add_argument("--variants", default="fgc,compile,triton", help=f"comma-separated, of {', '.join(VARIANTS)}")
    r = commands.add_parser("run", help="train the packages and the HF loop (needs torch and transformers)")
    r.add_argument("directory", type=Path)
    r.add_argument("--steps", type=int, default=30, help="warm-up steps, then as many timed")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--csv", type=Path, help="the table as CSV")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        variants = args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"--variants: unknown {unknown[0]!r}: expected one of {', '.join(VARIANTS)}")
        prepare(args.directory, args.shape, variants)
    else:
        run(args.directory, args.device, args.steps, args.csv)


if __name__ == "__main__":
    main()
