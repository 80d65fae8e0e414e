"""``metrics.jsonl``: one JSON object a line, appended, flushed line by line (CONTRACT §3).

Training lines carry, in order: step, loss, lr, grad_norm, tokens, tokens_per_s, mfu,
peak_mem_bytes, elapsed_s. Eval lines are ``{"step", "eval_loss"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_FIELDS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "mfu",
    "peak_mem_bytes",
    "elapsed_s",
)


class MetricsLogger:
    """Appends records to ``OUTPUT_DIR/metrics.jsonl``; does nothing when ``enabled`` is false
    (ranks other than 0 pass ``enabled=False``)."""

    def __init__(self, output_dir, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # append: a resumed run continues the same file
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write ``record`` as one JSON line, keys in the given order, and flush it."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_record(
    step, loss, lr, grad_norm, tokens, tokens_per_s, mfu, peak_mem_bytes, elapsed_s
) -> dict:
    """A training record with exactly the CONTRACT §3 fields, in order."""
    return {
        "step": int(step),
        "loss": float(loss),
        "lr": float(lr),
        "grad_norm": float(grad_norm),
        "tokens": int(tokens),
        "tokens_per_s": float(tokens_per_s),
        "mfu": None if mfu is None else float(mfu),
        "peak_mem_bytes": int(peak_mem_bytes),
        "elapsed_s": float(elapsed_s),
    }


def eval_record(step, eval_loss) -> dict:
    """An eval record: ``{"step", "eval_loss"}``."""
    return {"step": int(step), "eval_loss": float(eval_loss)}


def format_record(record: dict) -> str:
    """A short console line, e.g. ``step 10 | loss 3.1234 | lr 1.00e-03 | grad_norm 1.23 | 12,345 tok/s``."""
    parts = [f"step {record['step']}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"grad_norm {record['grad_norm']:.2f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)
