"""Typed trainer settings, selected in a config like any other callable.

A config's ``trainer`` target is a call of one of these frozen dataclasses, e.g.
``trainer: !singleton:fgc.settings:DDPTrainer``, holding one settings object per concern (data,
precision, checkpointing, logging, parallelism), each itself selected in the config; swapping the
trainer type, or any group, is a one-line override.
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
class PrecisionSettings:
    """Numeric formats: ``fp32``; ``bf16-mixed`` (fp32 weights, bf16 autocast); ``bf16`` (bf16
    weights and activations)."""

    mode: Precision = "fp32"


@dataclass(frozen=True)
class CheckpointSettings:
    """When checkpoints are written (in optimizer steps; 0: only at the end) and how many stay."""

    save_every: int = 0
    keep_last_n: Optional[int] = 2  # None: keep every checkpoint


@dataclass(frozen=True)
class LoggingSettings:
    """Cadences of the metrics line and of evaluation, in optimizer steps (0: never)."""

    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4


@dataclass(frozen=True)
class DataParallelSettings:
    """Data parallelism: ``nproc`` processes per node, each holding the whole model."""

    nproc: int = 2


@dataclass(frozen=True)
class FSDPSettings(DataParallelSettings):
    """Fully sharded data parallelism (FSDP2): ``nproc`` processes per node, each holding a shard
    of every parameter, gradient and optimizer state; one unit per decoder layer plus the root."""

    reshard_after_forward: bool = True


@dataclass(frozen=True)
class ParamGroupSettings:
    """Which parameters get no weight decay: regular expressions searched in parameter names."""

    no_weight_decay: tuple[str, ...] = ("norm", "bias", "embed")


@dataclass(frozen=True)
class ActivationCheckpointSettings:
    """Recompute activations in the backward instead of keeping them: ``none``, or ``full``
    (every decoder layer keeps only its input)."""

    mode: Literal["none", "full"] = "none"


@dataclass(frozen=True)
class CompileSettings:
    """``torch.compile`` each decoder layer (after activation checkpointing, as the plan orders)."""

    enabled: bool = False
    mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    fullgraph: bool = False


@dataclass(frozen=True)
class BasicTrainer:
    """One process: ``python train.py``."""

    TYPE: ClassVar[str] = "basic"

    max_steps: int = 100
    batch_size: int = 8  # global batch, in sequences, per optimizer step
    micro_batch_size: Optional[int] = None  # sequences per forward on each rank; None: all of it
    seq_len: int = 128
    grad_clip: Optional[float] = 1.0
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "output"
    data: DataSettings = field(default_factory=DataSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    activation_checkpointing: ActivationCheckpointSettings = field(
        default_factory=ActivationCheckpointSettings
    )
    compile: CompileSettings = field(default_factory=CompileSettings)
    param_groups: ParamGroupSettings = field(default_factory=ParamGroupSettings)

    @property
    def nproc(self) -> int:
        return 1


@dataclass(frozen=True)
class DDPTrainer(BasicTrainer):
    """Data parallel over ``parallel.nproc`` processes per node (torch DistributedDataParallel)."""

    TYPE: ClassVar[str] = "ddp"

    parallel: DataParallelSettings = field(default_factory=DataParallelSettings)

    @property
    def nproc(self) -> int:
        return self.parallel.nproc


@dataclass(frozen=True)
class FSDP2Trainer(DDPTrainer):
    """Fully sharded data parallel over ``parallel.nproc`` processes per node (torch FSDP2)."""

    TYPE: ClassVar[str] = "fsdp2"

    parallel: FSDPSettings = field(default_factory=FSDPSettings)


TRAINER_TYPES = {cls.TYPE: cls for cls in (BasicTrainer, DDPTrainer, FSDP2Trainer)}

# The setting groups a trainer holds, and the schema of each (for checks and codegen).
SETTING_GROUPS = {
    "data": DataSettings,
    "precision": PrecisionSettings,
    "checkpoint": CheckpointSettings,
    "logging": LoggingSettings,
    "parallel": DataParallelSettings,
    "activation_checkpointing": ActivationCheckpointSettings,
    "compile": CompileSettings,
    "param_groups": ParamGroupSettings,
}
