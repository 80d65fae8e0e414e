"""``metrics.jsonl``: one JSON object a line, appended, flushed line by line (docs/package.md, metrics.jsonl).

Training lines carry, in order: step, loss, lr, grad_norm, tokens, tokens_per_s, mfu,
peak_mem_bytes, elapsed_s, and eta_s (seconds left, at this run's pace). Eval lines are
``{"step", "eval_loss"}``.

When ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package), the same numbers
also go to TensorBoard event files in ``OUTPUT_DIR/tensorboard/`` (``train/loss``,
``eval/eval_loss``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from .log import format_duration

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
    "eta_s",
)


def tensorboard_writer(log_dir, purge_step: int | None = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` (events from ``purge_step`` on,
    left by an earlier run, hidden), or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of ``path`` whose step is after ``step``, and any line a kill cut short;
    the number of lines removed.

    A run resumed from the checkpoint of STEP runs the steps after it again, so their records
    from the interrupted run would otherwise appear twice. The file is replaced atomically.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed while writing it
            dropped += 1
            continue
        if record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


class MetricsLogger:
    """Appends records to ``OUTPUT_DIR/metrics.jsonl`` and, with ``tensorboard`` (and the package
    installed), writes their numbers to ``OUTPUT_DIR/tensorboard/``; does nothing when
    ``enabled`` is false (ranks other than 0 pass ``enabled=False``).

    A run that starts at ``start_step`` (the step of the checkpoint it resumes, 0 for a fresh
    run) continues the same file: records after ``start_step`` are first removed (see
    ``drop_records_after``; ``self.dropped`` counts them) and TensorBoard hides its events from
    those steps (``purge_step``), so every step is logged once.
    """

    def __init__(self, output_dir, enabled: bool = True, tensorboard: bool = False, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self.tensorboard = None
        self.dropped = 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.dropped = drop_records_after(self.path, start_step)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self.tensorboard = tensorboard_writer(Path(output_dir) / "tensorboard", purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        """Write ``record`` as one JSON line, keys in the given order, and flush it."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tensorboard is not None:
            section = "eval" if "eval_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{section}/{key}", value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        """Close the file and the event writer (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_record(
    step, loss, lr, grad_norm, tokens, tokens_per_s, mfu, peak_mem_bytes, elapsed_s, eta_s=None
) -> dict:
    """A training record: the documented fields (docs/package.md, metrics.jsonl) in order, then ``eta_s`` (None: unknown)."""
    return {
        "step": int(step),
        "loss": float(loss),
        "lr": float(lr),
        "grad_norm": None if grad_norm is None else float(grad_norm),  # None: not measured
        "tokens": int(tokens),
        "tokens_per_s": float(tokens_per_s),
        "mfu": None if mfu is None else float(mfu),
        "peak_mem_bytes": int(peak_mem_bytes),
        "elapsed_s": float(elapsed_s),
        "eta_s": None if eta_s is None else float(eta_s),
    }


def eta_seconds(elapsed_s: float, steps_done: int, steps_left: int) -> float | None:
    """Seconds left at the pace so far (``elapsed_s`` over ``steps_done`` steps of this run);
    None before the first step."""
    if steps_done <= 0:
        return None
    return elapsed_s / steps_done * max(steps_left, 0)


def eval_record(step, eval_loss) -> dict:
    """An eval record: ``{"step", "eval_loss"}``."""
    return {"step": int(step), "eval_loss": float(eval_loss)}


def format_record(record: dict) -> str:
    """A short console line, e.g.
    ``step 10 | loss 3.1234 | lr 1.00e-03 | grad_norm 1.23 | 12,345 tok/s | mfu 41.2% | peak 1.20 GiB | eta 3m05s``
    (mfu when known; peak memory and ETA when the record has them)."""
    parts = [f"step {record['step']}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.2f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "peak_mem_bytes" in record:
        parts.append(f"peak {record['peak_mem_bytes'] / 2**30:.2f} GiB")
    if record.get("eta_s") is not None:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def format_progress(record: dict) -> str:
    """What a progress bar shows after the bar: ``loss 3.1234 | eta 3m05s``."""
    return f"loss {record['loss']:.4f} | eta {format_duration(record.get('eta_s'))}"
