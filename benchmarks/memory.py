"""Benchmark: `fgc explain`'s peak-memory estimate against the peak measured in one training step.

For a few sizes of the main example: build it, estimate with fgc's explain code, then run one
optimizer step of the generated model on CPU under torch's MemTracker (which attributes every
tensor to parameters, gradients, optimizer state or activations) and print both.
Goal: the estimate within 25% of the measured peak.

    python benchmarks/memory.py [--csv out.csv]
"""

from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
from pathlib import Path

from _table import print_table

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from fgc.build import build_package, compile_config
from fgc.explain import memory_estimate, model_facts

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"
SIZES = [
    {"hidden_size": 96, "num_hidden_layers": 3, "batch_size": 8, "seq_len": 128},
    {"hidden_size": 256, "num_hidden_layers": 4, "batch_size": 8, "seq_len": 256},
    {"hidden_size": 512, "num_hidden_layers": 6, "batch_size": 4, "seq_len": 512},
    {"hidden_size": 512, "num_hidden_layers": 6, "batch_size": 4, "seq_len": 512, "activation_checkpointing": "full"},
]


def measure(package: Path, batch: int, seq_len: int, vocab: int, checkpointed: bool) -> dict[str, int]:
    """Peak bytes by kind over the second forward, backward and AdamW step."""
    sys.path.insert(0, str(package))
    try:
        namespace = runpy.run_path(str(package / "model.py"))
    finally:
        sys.path.remove(str(package))
    torch.manual_seed(0)
    model = namespace["build_model"]()
    if checkpointed:
        from fgc_runtime.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, seq_len + 1))

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (loss / ids[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the steady state: optimizer state exists before the measured step
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_name = {str(k).split(".")[-1]: v for k, v in snap.items()}
    return {
        "parameters": by_name.get("PARAM", 0) + by_name.get("BUFFER", 0),
        "gradients": by_name.get("GRAD", 0),
        "optimizer state": by_name.get("OPT", 0),
        "activations": by_name.get("ACT", 0) + by_name.get("TEMP", 0),
        "total": by_name.get("Total", 0),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for size in SIZES:
        variables = dict(size, trainer_type="basic")
        compiled = compile_config(EXAMPLE, variables=variables)
        facts = model_facts(compiled)
        estimate = memory_estimate(compiled, facts)
        with tempfile.TemporaryDirectory() as tmp:
            build_package(compiled, Path(tmp) / "pkg", smoke=False)
            checkpointed = size.get("activation_checkpointing") == "full"
            measured = measure(Path(tmp) / "pkg", size["batch_size"], size["seq_len"], facts.vocab, checkpointed)
        label = f"h{size['hidden_size']} L{size['num_hidden_layers']} b{size['batch_size']} s{size['seq_len']}"
        label += " AC" if checkpointed else ""
        for kind in estimate:
            rows.append(
                {
                    "model": label,
                    "kind": kind,
                    "estimate_mib": round(estimate[kind] / 2**20, 2),
                    "measured_mib": round(measured[kind] / 2**20, 2),
                    "estimate/measured": round(estimate[kind] / measured[kind], 2) if measured[kind] else None,
                }
            )
    print_table(rows, args.csv)


if __name__ == "__main__":
    main()
