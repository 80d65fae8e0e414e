"""Typed trainer settings, selected in a config like any other callable.

A config's ``trainer`` target is a call of one of these frozen dataclasses, e.g.
``trainer: !singleton:fgc.settings:DDPTrainer``, holding one settings object per concern (data,
precision, checkpointing, logging, parallelism), each itself selected in the config; swapping the
trainer type, or any group, is a one-line override.
fgc constructs them at build time (they are plain data), checks their fields, and specialises the
generated ``train.py`` to the values: they are compiled away, never imported by the package.
A number's range is part of its annotation (``Annotated[int, Range(ge=1)]``): the check-types pass
refuses a value outside it at its config line, so a setting that would fail or do nothing at run
time (a negative cadence, a zero batch, a NaN) never builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, Optional

from fgc_lowering.types import Range

Precision = Literal["fp32", "bf16-mixed", "bf16", "fp16-mixed"]
# the ranges of the settings' numbers
Count = Annotated[int, Range(ge=1)]  # a size or a number of things: at least 1
Cadence = Annotated[int, Range(ge=0)]  # every N steps; 0: never
Fraction = Annotated[float, Range(ge=0, lt=1)]
NonNegative = Annotated[float, Range(ge=0)]
Positive = Annotated[float, Range(gt=0)]
Seed = Annotated[int, Range(ge=0, le=2**63 - 1)]  # what torch.manual_seed takes


@dataclass(frozen=True)
class DataSettings:
    """Where the trainer's tokens come from.

    ``text_files``: plain-text files (paths relative to the config file that names them) that
    ``fgc build`` tokenizes with the built-in byte tokenizer into the package's ``data/``
    directory, which then is the trainer's default ``--data``. ``data_dir``: a token-shard
    directory (docs/package.md, token shards) to use as the default ``--data`` instead.
    """

    text_files: tuple[str, ...] = ()
    data_dir: Optional[str] = None
    val_fraction: Fraction = 0.1


@dataclass(frozen=True)
class PrecisionSettings:
    """Numeric formats: ``fp32``; ``bf16-mixed`` (fp32 weights, bf16 autocast); ``bf16`` (bf16
    weights and activations); ``fp16-mixed`` (fp32 weights, fp16 autocast, a gradient scaler;
    basic and DDP trainers only)."""

    mode: Precision = "fp32"


@dataclass(frozen=True)
class CheckpointSettings:
    """When checkpoints are written (in optimizer steps; 0: only at the end) and how many stay."""

    save_every: Cadence = 0
    keep_last_n: Optional[Cadence] = 2  # None or 0: keep every checkpoint


@dataclass(frozen=True)
class LoggingSettings:
    """Cadences of the metrics line, of evaluation and of text samples, in optimizer steps
    (0: never); TensorBoard output; what a sample is."""

    log_every: Cadence = 10
    eval_every: Cadence = 0
    eval_batches: Count = 4
    eval_batch_size: Optional[Count] = None  # sequences per eval batch; None: the train batch
    # TensorBoard event files in OUTPUT_DIR/tensorboard/ (when the tensorboard package is installed)
    tensorboard: bool = True
    # a text sample every sample_every steps (0: never): sample_tokens tokens after sample_prompt,
    # greedy at temperature 0, else drawn with a generator seeded by the run's seed and the step
    sample_every: Cadence = 0
    sample_prompt: str = "The"
    sample_tokens: Count = 64
    sample_temperature: NonNegative = 0.0


@dataclass(frozen=True)
class DataParallelSettings:
    """Data parallelism: ``nproc`` processes per node, each holding the whole model.

    ``tensor_degree``: with T > 1, groups of T neighbouring ranks split each decoder layer's
    attention and MLP projections (tensor parallelism, applied first), and the ``nproc / T``
    groups are the data-parallel replicas. ``nproc`` must be divisible by T, and T must divide the
    model's query and key/value heads and its MLP intermediate size. The DDP, FSDP2, pipeline
    and DiLoCo trainers take it (DiLoCo: each worker is one or more tensor-parallel groups)."""

    nproc: Count = 2
    tensor_degree: Count = 1


@dataclass(frozen=True)
class FSDPSettings(DataParallelSettings):
    """Fully sharded data parallelism (FSDP2): ``nproc`` processes per node, each holding a shard
    of every parameter, gradient and optimizer state; one unit per decoder layer plus the root.

    ``tensor_degree`` (see :class:`DataParallelSettings`): FSDP2 shards over the ``nproc / T``
    tensor-parallel groups. ``replicate_degree``: with R > 1, hybrid sharding (HSDP): the
    data-parallel ranks form R copies of the model, each sharded over ``nproc / (R * T)`` ranks;
    gradients are reduced inside a copy, then averaged over the copies."""

    reshard_after_forward: bool = True
    replicate_degree: Count = 1


# fgc's schedule names, and torch's class for each (torch.distributed.pipelining), which a config
# may write instead, as Forgather configs do: the settings keep fgc's name
SCHEDULE_ALIASES = {
    "ScheduleGPipe": "gpipe",
    "Schedule1F1B": "1f1b",
    "ScheduleInterleaved1F1B": "interleaved-1f1b",
    "ScheduleLoopedBFS": "looped-bfs",
    "ScheduleInterleavedZeroBubble": "interleaved-zero-bubble",
    "ScheduleZBVZeroBubble": "zbv-zero-bubble",
    "ScheduleDualPipeV": "dualpipev",
}
PipelineSchedule = Literal[
    "gpipe",
    "1f1b",
    "interleaved-1f1b",
    "looped-bfs",
    "interleaved-zero-bubble",
    "zbv-zero-bubble",
    "dualpipev",
    "ScheduleGPipe",
    "Schedule1F1B",
    "ScheduleInterleaved1F1B",
    "ScheduleLoopedBFS",
    "ScheduleInterleavedZeroBubble",
    "ScheduleZBVZeroBubble",
    "ScheduleDualPipeV",
]
# schedules that run several stages per rank, and how those stages are laid out over ranks
MULTI_STAGE_SCHEDULES = {
    "interleaved-1f1b": "loop",
    "looped-bfs": "loop",
    "interleaved-zero-bubble": "loop",
    "zbv-zero-bubble": "v",
    "dualpipev": "v",
}
# schedules that split the backward into input and weight gradients (torch.compile cannot)
SPLIT_BACKWARD_SCHEDULES = ("interleaved-zero-bubble", "zbv-zero-bubble", "dualpipev")


@dataclass(frozen=True)
class PipelineSettings(DataParallelSettings):
    """Pipeline parallelism (torch.distributed.pipelining): the decoder layers are split into
    stages, balanced by parameter count, over ``pipeline_degree`` ranks; ``data_degree`` copies of
    the pipeline train on different data. ``nproc`` must equal ``pipeline_degree * data_degree``.

    ``stages_per_rank``: 1 for ``gpipe`` and ``1f1b``; 2 or more for the interleaved schedules
    (stage s on rank s mod pipeline_degree: the loop layout), exactly 2 for ``zbv-zero-bubble`` and
    ``dualpipev`` (rank r holds stages r and 2*pipeline_degree-1-r: the V layout); None picks these.
    ``microbatches``: how many pieces each data-parallel replica's batch is cut into (None: the
    number of stages). ``tensor_degree`` (see :class:`DataParallelSettings`): each stage's layers
    are split over T neighbouring ranks, and ``nproc = pipeline_degree * data_degree * T``.
    ``fsdp``: the ``data_degree`` replicas shard each stage's parameters, gradients and optimizer
    state with FSDP2 (one unit per decoder layer, one per stage for the rest) instead of each
    holding a copy and summing gradients. ``schedule`` also takes torch's class names
    (``Schedule1F1B``, ``ScheduleZBVZeroBubble``, ...), kept as fgc's names.
    """

    pipeline_degree: Count = 2
    data_degree: Count = 1
    fsdp: bool = False
    schedule: PipelineSchedule = "1f1b"
    stages_per_rank: Optional[Count] = None
    microbatches: Optional[Count] = None

    def __post_init__(self):
        # torch's class name (Schedule1F1B) reads as fgc's schedule name (1f1b)
        object.__setattr__(self, "schedule", SCHEDULE_ALIASES.get(self.schedule, self.schedule))


@dataclass(frozen=True)
class DiLoCoSettings:
    """DiLoCo's outer loop: every ``inner_steps`` optimizer steps the workers average their
    pseudo-gradients (global minus local parameters), and an outer SGD with Nesterov momentum
    (``outer_lr``, ``outer_momentum``) steps the global parameters, which every worker then
    copies.

    ``workers``: how many workers the ``nproc`` ranks form (None: every rank is one, or with
    ``parallel.tensor_degree`` T, every tensor-parallel group of T ranks, or with
    :class:`PipelineSettings`, every pipeline of ``pipeline_degree`` x T ranks). With W < nproc, each
    worker is ``nproc / W`` neighbouring ranks training one copy of the model: split over
    tensor-parallel groups of T ranks when T > 1, and with DDP over the worker's
    ``nproc / (W * T)`` data-parallel ranks (their gradients averaged every step), or, when the
    trainer's ``parallel`` settings are :class:`FSDPSettings`, sharded over them with FSDP2
    (HSDP with ``replicate_degree``); with :class:`PipelineSettings` a worker is one or more
    pipelines, which sum their gradients. The workers still sync only every ``inner_steps``
    steps."""

    inner_steps: Count = 20
    outer_lr: Positive = 0.7
    outer_momentum: Fraction = 0.9
    workers: Optional[Count] = None


@dataclass(frozen=True)
class ParamGroupSettings:
    """Which parameters get no weight decay: regular expressions searched in parameter names."""

    no_weight_decay: tuple[str, ...] = ("norm", "bias", "embed")


@dataclass(frozen=True)
class PretrainedSettings:
    """Where the model's initial weights come from: ``model_dir``, a local Hugging Face model
    directory whose safetensors ``build_model`` loads (None: the model's own initialisation)."""

    model_dir: Optional[str] = None


@dataclass(frozen=True)
class LossSettings:
    """The language-model loss: token cross-entropy, optionally with label smoothing, z-loss
    (``z_loss * logsumexp(logits)²`` a token, PaLM) and logit soft-capping
    (``softcap * tanh(logits / softcap)``, Gemma 2).

    ``impl`` picks the kernel (``fgc_runtime.kernels.fused_linear_cross_entropy``): ``torch`` (the
    reference: every logit materialised), ``chunked`` (the head and the loss a chunk of tokens at
    a time: one chunk's logits in memory), ``triton`` (CUDA: the same chunks, the
    work between the matmuls in one Triton kernel), or ``auto``: fgc's select-kernels pass chooses from the trainer, the device, the
    features and the size of the logits. A feature the chosen kernel lacks is an error.

    A chunk holds as many tokens as keep its fp32 logits and their gradient (8 bytes a logit)
    within ``chunk_budget_mib`` MiB: ``budget // (vocab_size * 8)`` rows, at least 1, which the
    plan states. ``chunk_size`` (tokens) fixes the rows instead (None: from the budget).
    """

    impl: Literal["auto", "torch", "chunked", "triton"] = "auto"
    label_smoothing: Fraction = 0.0
    z_loss: NonNegative = 0.0
    softcap: Optional[Positive] = None
    chunk_size: Optional[Count] = None
    chunk_budget_mib: Positive = 64.0


@dataclass(frozen=True)
class ActivationCheckpointSettings:
    """Recompute activations in the backward instead of keeping them: ``none``; ``full`` (a
    checkpointed decoder layer keeps only its input); ``selective`` (a checkpointed layer keeps
    the outputs of its matmuls and attention, and recomputes the cheap element-wise ops: norms,
    activations, rotary). ``every_n_layers``: checkpoint layers 0, n, 2n, ... (1: all of them)."""

    mode: Literal["none", "full", "selective"] = "none"
    every_n_layers: Count = 1


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

    max_steps: Count = 100
    batch_size: Count = 8  # global batch, in sequences, per optimizer step
    micro_batch_size: Optional[Count] = None  # sequences per forward on each rank; None: all of it
    seq_len: Count = 128
    # gradients are clipped to this total norm (None or inf: never clipped; the norm is logged)
    grad_clip: Optional[Annotated[float, Range(gt=0, finite=False)]] = 1.0
    # step each parameter inside the backward as soon as its gradient is complete, and free the
    # gradient (one process, no accumulation, no clipping)
    optimizer_in_backward: bool = False
    # Training windows are packed: they cut through documents, which end with the data's eos_id.
    # True: attention stays inside each document of a window, and positions restart at each one
    # (the model's forward takes document ids after input_ids, as the library's CausalLM does).
    document_masking: bool = False
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On a CPU device, freed host memory stays in the process for the next step (glibc's malloc
    # options, fgc_runtime/host_memory.py) instead of going back to the system, whose pages each
    # step would fault in again. False: malloc as the process starts with it.
    keep_host_memory: bool = True
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
    loss: LossSettings = field(default_factory=LossSettings)
    pretrained: PretrainedSettings = field(default_factory=PretrainedSettings)

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


@dataclass(frozen=True)
class PipelineTrainer(DDPTrainer):
    """Pipeline parallel (optionally times data parallel) over ``parallel.nproc`` processes per
    node, with one of torch's pipeline schedules."""

    TYPE: ClassVar[str] = "pipeline"

    parallel: PipelineSettings = field(default_factory=PipelineSettings)


@dataclass(frozen=True)
class DiLoCoTrainer(DDPTrainer):
    """DiLoCo over ``parallel.nproc`` ranks per node: each worker (a rank, or with
    ``diloco.workers`` a group of ranks running DDP, or FSDP2 with ``parallel: FSDPSettings``,
    one or more pipelines with ``parallel: PipelineSettings``, and tensor parallelism with
    ``parallel.tensor_degree``)
    trains its own copy of the model with its own inner optimizer on its share of the batch, with
    no gradient all-reduce between workers, and the workers sync every ``diloco.inner_steps``
    steps (see :class:`DiLoCoSettings`)."""

    TYPE: ClassVar[str] = "diloco"

    diloco: DiLoCoSettings = field(default_factory=DiLoCoSettings)


TRAINER_TYPES = {
    cls.TYPE: cls for cls in (BasicTrainer, DDPTrainer, FSDP2Trainer, PipelineTrainer, DiLoCoTrainer)
}

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
    "loss": LossSettings,
    "pretrained": PretrainedSettings,
    "diloco": DiLoCoSettings,
}
