"""What the trainer benchmarks share: loading a generated package's train.py and running its main(),
a plain training loop, and transformers' Llama of a given shape. Imports only torch (and
transformers for `hf_llama`), so that it runs where fgc is not installed (the GPU benchmark's
machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.1
# the main example's defaults (examples/tiny_llama/train.yaml), as a new user runs it
EXAMPLE_SHAPE = {
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "seq_len": 128,
    "batch_size": 16,
}
# a larger shape, where the matmuls take most of a step
H256_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
    "seq_len": 256,
    "batch_size": 8,
}

# A script run from benchmarks/ has that folder first on sys.path, where benchmarks/kernels.py
# would stand for the `kernels` package that transformers looks for (and then fail to import).
# The benchmarks' own modules are imported by now; the folder leaves the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

_loaded_packages: list[str] = []


def import_train_module(package: Path):
    """The generated train.py of PACKAGE as a module (its model.py and fgc_runtime/ beside it).

    Each package has its own `model` and `fgc_runtime` (a package vendors only the runtime
    modules its program reaches), so the previous package is first taken off `sys.path` and its
    modules out of `sys.modules` (a loaded train module keeps its own).
    """
    while _loaded_packages:
        sys.path.remove(_loaded_packages.pop())
    for name in [n for n in sys.modules if n == "model" or n.split(".")[0] == "fgc_runtime"]:
        del sys.modules[name]
    sys.path.insert(0, str(package))
    _loaded_packages.append(str(package))
    spec = importlib.util.spec_from_file_location(f"fgc_generated_train_{package.name}", package / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_loop(model, batches, steps: int, hf: bool, device=None, autocast_dtype=None):
    """A plain loop's step (forward, loss, backward, clip, AdamW), after STEPS warm-up steps.

    BATCHES(i) gives step i's (ids, labels) on the CPU; they are moved to DEVICE (the model's).
    With AUTOCAST_DTYPE the forward and the loss run under `torch.autocast` of that dtype (the
    weights and the optimizer stay fp32: mixed precision). Returns `run(n)`, which times N more
    steps and gives their tokens/s.
    """
    device = torch.device(device or next(model.parameters()).device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    model.train()
    position = 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i):
        ids, labels = (t.to(device, non_blocking=True) for t in batches(i))
        autocast = (
            torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        )
        with autocast:
            if hf:  # the usual way: the model shifts the labels itself (T - 1 targets a row)
                loss = model(input_ids=ids, labels=ids).loss
            else:
                logits = model(ids)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(n: int) -> float:
        nonlocal position
        sync()
        start = time.perf_counter()
        for i in range(position, position + n):
            step(i)
        sync()
        elapsed = time.perf_counter() - start
        position += n
        ids, _ = batches(0)
        return n * ids.numel() / elapsed

    run(steps)  # warm-up
    return run


def steady_record(train, steps: int, device: str = "cpu") -> dict:
    """The last metrics record of the loaded train module's own main() over 2 x STEPS steps,
    logged every STEPS (its tokens/s is the steady-state rate of the second interval), in a
    temporary output directory, without evaluation or resuming, its log lines silenced."""
    with tempfile.TemporaryDirectory() as out:
        flags = ["--output-dir", out, "--device", device, "--resume", "never", "--eval-every", "0"]
        with contextlib.redirect_stdout(io.StringIO()):  # its own log lines
            train.main(flags + ["--max-steps", str(2 * steps), "--log-every", str(steps)])
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r][-1]


def hf_llama(shape: dict, vocab: int):
    """transformers' LlamaForCausalLM (sdpa attention) of SHAPE, the benchmarks' shape dict."""
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
