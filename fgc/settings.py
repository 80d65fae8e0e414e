"""Typed trainer settings, selected in a config like any other callable.

A config's ``trainer`` target is a call of one of these frozen dataclasses, e.g.
``trainer: !singleton:fgc.settings:DDPTrainer``; swapping the trainer type is a one-line override.
fgc constructs them at build time (they are plain data), checks their fields, and specialises the
generated ``train.py`` to the values: they are compiled away, never imported by the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

Precision = Literal["fp32", "bf16-mixed", "bf16"]


@dataclass(frozen=True)
class DataSettings:
    """Where the trainer's tokens come from.

    ``text_files``: plain-text files (paths relative to the config file that names them) that
    ``fgc build`` tokenizes with the built-in byte tokenizer into the package's ``data/``
    directory, which then is the trainer's default ``--data``. ``data_dir``: a token-shard
    directory (CONTRACT §5) to use as the default ``--data`` instead.
    """

    text_files: tuple[str, ...] = ()
    data_dir: Optional[str] = None
    val_fraction: float = 0.1


@dataclass(frozen=True)
class BasicTrainer:
    """One process: ``python train.py``."""

    TYPE: ClassVar[str] = "basic"

    data: DataSettings = field(default_factory=DataSettings)
    max_steps: int = 100
    batch_size: int = 8  # global batch, in sequences, per optimizer step
    micro_batch_size: Optional[int] = None  # sequences per forward on each rank; None: all of it
    seq_len: int = 128
    grad_clip: Optional[float] = 1.0
    precision: Precision = "fp32"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "output"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep_last_n: Optional[int] = 2

    @property
    def nproc(self) -> int:
        return 1


@dataclass(frozen=True)
class DDPTrainer(BasicTrainer):
    """Data parallel over ``nproc`` processes per node (torch DistributedDataParallel)."""

    TYPE: ClassVar[str] = "ddp"

    nproc: int = 2  # type: ignore[assignment]


TRAINER_TYPES = {cls.TYPE: cls for cls in (BasicTrainer, DDPTrainer)}
