"""Forgather's trainer classes, read as fgc's trainer settings (docs/porting-from-forgather.md).

A Forgather config names its trainer as ``trainer: !singleton:forgather.ml.trainer:Trainer`` with
``args: *trainer_args``, a ``forgather.ml.trainer:TrainingArguments`` (or one of its subclasses).
Forgather is not needed to build: the resolve-callables pass calls :func:`port_forgather_trainers`
first, which rewrites each such trainer node into the fgc trainer settings class the table below
registers for it, moving every argument that has an fgc equivalent to its fgc setting and reporting
every argument that has none as one error at its line, naming what to write instead.

The mapping is data: :data:`TRAINERS` (class spec -> fgc trainer class), :data:`ARGS_CLASSES` (the
argument classes), :data:`ARGUMENTS` (argument -> fgc setting or what to write instead) and
:data:`TRAINER_KEYWORDS` (the trainer constructor's own keywords). Keywords that already are fgc
trainer settings (``data``, ``precision``, ``parallel``, ...) pass through unchanged, so a port
adds fgc's data settings next to ``args``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fgc.errors import Location
from fgc.ir import IRGraph, Node
from fgc.settings import BasicTrainer, DDPTrainer, PipelineTrainer

from .context import LoweringContext

# Forgather's trainer classes, under every spec its template library writes them, and the fgc
# trainer each one becomes
TRAINERS: dict[str, type] = {
    "forgather.ml.trainer:Trainer": BasicTrainer,
    "forgather.ml:Trainer": BasicTrainer,
    "forgather.ml.trainer.trainer:Trainer": BasicTrainer,
    "forgather.ml.trainer.accelerate:AccelTrainer": DDPTrainer,
    "forgather.ml.trainer.accelerate.accel_trainer:AccelTrainer": DDPTrainer,
    "forgather.ml.trainer.pipeline:PipelineTrainer": PipelineTrainer,
    "forgather.ml.trainer.pipeline.pipeline_trainer:PipelineTrainer": PipelineTrainer,
}

# Forgather's trainer-arguments classes: each is read only through a trainer's ``args``
ARGS_CLASSES: tuple[str, ...] = (
    "forgather.ml.trainer:TrainingArguments",
    "forgather.ml:TrainingArguments",
    "forgather.ml.trainer.trainer:TrainingArguments",
    "forgather.ml.trainer.accelerate:AccelTrainingArguments",
    "forgather.ml.trainer.accelerate.accel_trainer:AccelTrainingArguments",
    "forgather.ml.trainer.pipeline:PipelineTrainingArguments",
    "forgather.ml.trainer.pipeline.pipeline_trainer:PipelineTrainingArguments",
)


@dataclass(frozen=True)
class To:
    """An argument with an fgc equivalent: the settings path it sets (``("logging", "log_every")``),
    or a special rule named by ``rule`` that :func:`_apply_rule` carries out."""

    path: tuple[str, ...] = ()
    rule: str | None = None
    pipeline_only: bool = False


@dataclass(frozen=True)
class Instead:
    """An argument without an fgc equivalent: what to write instead."""

    text: str


_DATALOADER = Instead("remove it: the trainer reads token shards (fgc data) by memory map, with no loader workers")
_EPOCHS = Instead("write max_steps: fgc trains for a number of optimizer steps")
_DEBUG = Instead("remove it: `fgc explain CONFIG` prints the plan, the stages and the memory per rank")

# TrainingArguments (and its subclasses') arguments
ARGUMENTS: dict[str, To | Instead] = {
    "output_dir": To(("output_dir",)),
    "max_steps": To(rule="max_steps"),
    "seed": To(rule="seed"),
    "per_device_train_batch_size": To(rule="batch"),
    "gradient_accumulation_steps": To(rule="batch"),
    "per_device_eval_batch_size": To(("logging", "eval_batch_size")),
    "max_eval_steps": To(rule="max_eval_steps"),
    "logging_steps": To(("logging", "log_every")),
    "logging_strategy": To(rule="logging_strategy"),
    "eval_steps": To(rule="eval"),
    "eval_strategy": To(rule="eval"),
    "save_steps": To(rule="save"),
    "save_strategy": To(rule="save"),
    "save_total_limit": To(("checkpoint", "keep_last_n")),
    "max_grad_norm": To(("grad_clip",)),
    "learning_rate": To(rule="optimizer:lr"),
    "weight_decay": To(rule="optimizer:weight_decay"),
    "adam_epsilon": To(rule="optimizer:eps"),
    "lr_scheduler_type": To(rule="schedule"),
    "warmup_steps": To(rule="schedule"),
    "torch_compile": To(("compile", "enabled")),
    "torch_compile_mode": To(("compile", "mode")),
    "torch_compile_full_graph": To(("compile", "fullgraph")),
    "gradient_checkpointing": To(rule="activation_checkpointing"),
    "use_cpu": To(rule="use_cpu"),
    "fuse_optim_with_backward": To(("optimizer_in_backward",)),
    "n_microbatches": To(("parallel", "microbatches"), pipeline_only=True),
    "stages_per_rank": To(("parallel", "stages_per_rank"), pipeline_only=True),
    # no equivalent
    "logging_dir": Instead("remove it: metrics go to OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/tensorboard/"),
    "logging_first_step": Instead("remove it: the first metrics line is at step log_every"),
    "num_train_epochs": _EPOCHS,
    "epoch_train_steps": _EPOCHS,
    "device": Instead("remove it: train.py takes --device auto|cpu|cuda (use_cpu: true maps to device cpu)"),
    "dataloader_num_workers": _DATALOADER,
    "dataloader_pin_memory": _DATALOADER,
    "dataloader_persistent_workers": _DATALOADER,
    "dataloader_prefetch_factor": _DATALOADER,
    "dataloader_drop_last": _DATALOADER,
    "eval_delay": Instead("remove it: evaluation runs every eval_steps from the start"),
    "torch_compile_backend": Instead("remove it: fgc compiles with torch.compile's default backend"),
    "torch_compile_dynamic": Instead("remove it: fgc compiles each decoder layer with static shapes"),
    "save_safetensors": Instead("remove it: checkpoints are always safetensors (final/ is a Hugging Face directory)"),
    "save_on_each_node": Instead("remove it: rank 0 writes each checkpoint"),
    "overwrite_output_dir": Instead("remove it: train.py resumes from OUTPUT_DIR (--resume never starts afresh)"),
    "resume_from_checkpoint": Instead("remove it: train.py --resume auto|never|PATH"),
    "load_best_model_at_end": Instead("remove it: final/ is the last checkpoint's model"),
    "metric_for_best_model": Instead("remove it: final/ is the last checkpoint's model"),
    "greater_is_better": Instead("remove it: final/ is the last checkpoint's model"),
    "lr_scheduler_kwargs": Instead("write the schedule as the 'lr_scheduler' target, e.g. !partial:fgc_runtime.train:warmup_cosine"),
    "adam_beta1": Instead("write betas: !tuple [BETA1, BETA2] in the 'optimizer' target"),
    "adam_beta2": Instead("write betas: !tuple [BETA1, BETA2] in the 'optimizer' target"),
    "gc_threshold": Instead("remove it: the trainer does not drive Python's garbage collector"),
    "construct_model_on": Instead("remove it: each rank builds only its shards or stages (docs/training.md)"),
    "activation_memory_budget": Instead("write -D activation_checkpointing=full|selective, or activation_checkpointing: in the trainer"),
    "speed_metrics_start_step": Instead("remove it: tokens_per_s is measured on every logged step"),
    "num_processes": Instead("write parallel: !singleton:fgc.settings:DataParallelSettings {nproc: N} in the trainer"),
    "debug_pipeline": _DEBUG,
    "debug_split_model": _DEBUG,
    "debug_model_params": _DEBUG,
    "debug_model_init": _DEBUG,
    "pp_stage_type": Instead("remove it: the pipeline schedule picks the stage layout (parallel: schedule)"),
    "is_multistage": Instead("remove it: stages_per_rank > 1 makes the pipeline multi-stage"),
}

_DATA = "remove it; give the trainer data: !singleton:fgc.settings:DataSettings {data_dir: SHARDS} (shards from `fgc data`)"
# the trainer constructor's own keywords (besides ``args``)
TRAINER_KEYWORDS: dict[str, str | Instead] = {
    "optimizer_factory": "optimizer",  # must be the 'optimizer' target, which fgc reads
    "lr_scheduler_factory": "lr_scheduler",
    "model_init": Instead("remove it: fgc trains the config's 'model' target"),
    "model": Instead("remove it: fgc trains the config's 'model' target"),
    "train_dataset": Instead(_DATA),
    "eval_dataset": Instead(_DATA + " (val.bin is the eval split)"),
    "data_collator": Instead(_DATA),
    "processing_class": Instead("remove it: the tokenizer is the one `fgc data --tokenizer` used"),
    "tokenizer": Instead("remove it: the tokenizer is the one `fgc data --tokenizer` used"),
    "callbacks": Instead("remove it: metrics.jsonl, tensorboard/ and text samples (logging: sample_every) are built in"),
    "compute_loss_func": Instead("remove it: the loss is fgc's causal LM loss (loss: !singleton:fgc.settings:LossSettings)"),
    "distributed_env": Instead("remove it: launch.sh runs torchrun with the plan's ranks"),
    "accelerator": Instead("remove it: the ddp trainer takes parallel: !singleton:fgc.settings:DataParallelSettings {nproc: N}"),
    "model_splitter": Instead("remove it: fgc splits the decoder layers into stages by parameter count"),
    "pipe_schedule_factory": Instead("write parallel: !singleton:fgc.settings:PipelineSettings {schedule: 1f1b} in the trainer"),
    "enable_activation_checkpoint_fn": Instead("write activation_checkpointing: !singleton:fgc.settings:ActivationCheckpointSettings {mode: full}"),
    "fused_loss_factory": Instead("write loss: !singleton:fgc.settings:LossSettings {impl: chunked}"),
}

# a settings group's class, as fgc's template library writes it
_GROUP_SPECS = {
    "logging": "fgc.settings:LoggingSettings",
    "checkpoint": "fgc.settings:CheckpointSettings",
    "compile": "fgc.settings:CompileSettings",
    "activation_checkpointing": "fgc.settings:ActivationCheckpointSettings",
}
# Forgather's defaults where they differ from fgc's: a port trains as Forgather would
FORGATHER_DEFAULTS: dict[str, Any] = {
    "max_grad_norm": None,
    "logging_steps": 50,
    "save_steps": 1000,
    "per_device_train_batch_size": 16,
}
_SCHEDULES = {"cosine": "warmup_cosine", "constant": "constant", "constant_with_warmup": "constant"}


def is_forgather_trainer(spec: str | None) -> bool:
    """Whether SPEC names one of Forgather's trainer or trainer-arguments classes."""
    return spec in TRAINERS or spec in ARGS_CLASSES


class _Port:
    """The rewrite of one Forgather trainer node (and its args) into fgc trainer settings."""

    def __init__(self, ir: IRGraph, ctx: LoweringContext, trainer: Node):
        self.ir, self.ctx, self.trainer = ir, ctx, trainer
        self.cls = TRAINERS[trainer.spec]
        self.fields = {f.name for f in dataclasses.fields(self.cls)}
        self.label = trainer.spec

    # -- helpers
    def error(self, loc: Location, message: str, hint: str | None = None) -> None:
        self.ctx.sink.error(message, loc, hint)

    def literal(self, nid: str) -> Any:
        """The scalar a value node holds, or a sentinel for anything else."""
        node = self.ir.node(nid)
        return node.value if node.kind == "value" else _NOT_LITERAL

    def new_value(self, base: str, name: str, value: Any, loc: Location) -> str:
        nid = f"{base}.fgc_{name}"  # no config path is spelled so: the id is new
        self.ir.add(Node(nid, "value", loc, value=value))
        return nid

    def set(self, path: tuple[str, ...], nid: str, loc: Location, arg: str) -> None:
        """Set the trainer setting PATH to node NID, written at LOC by Forgather's argument ARG."""
        trainer = self.trainer
        if arg not in self.written and self._is_set(path):
            return  # Forgather's default yields to what the trainer's own settings write
        if len(path) == 1:
            if path[0] in trainer.kwargs:
                self.error(loc, f"{self.args_label}: argument {arg!r} sets {path[0]!r}, which the trainer also "
                           f"sets at {trainer.key_locs.get(path[0], trainer.loc)}", "remove one of them")
                return
            trainer.kwargs[path[0]] = nid
            trainer.key_locs[path[0]] = loc
            return
        group, key = path
        gid = trainer.kwargs.get(group)
        if gid is None:
            gid = f"{trainer.id}.{group}"
            self.ir.add(Node(gid, "call", loc, mode="singleton", spec=_GROUP_SPECS.get(group, "")))
            trainer.kwargs[group] = gid
            trainer.key_locs[group] = loc
        gnode = self.ir.node(gid)
        if gnode.kind != "call":
            self.error(loc, f"{self.args_label}: argument {arg!r} sets {group}.{key}, but the trainer's "
                       f"{group!r} is not a settings call")
            return
        if key in gnode.kwargs:
            self.error(loc, f"{self.args_label}: argument {arg!r} sets {group}.{key}, which is also set at "
                       f"{gnode.key_locs.get(key, gnode.loc)}", "remove one of them")
            return
        gnode.kwargs[key] = nid
        gnode.key_locs[key] = loc
        self.ir.link(gnode)

    def _is_set(self, path: tuple[str, ...]) -> bool:
        node = self.trainer
        for key in path:
            if node.kind != "call" or key not in node.kwargs:
                return False
            node = self.ir.node(node.kwargs[key])
        return True

    # -- the rewrite
    def run(self) -> None:
        trainer = self.trainer
        kwargs = dict(trainer.kwargs)
        key_locs = dict(trainer.key_locs)
        trainer.kwargs, trainer.key_locs = {}, {}
        if trainer.args:
            self.error(trainer.loc, f"{self.label}: positional arguments have no fgc equivalent",
                       "write args: *trainer_args and fgc's own trainer settings as keywords")
            trainer.args = []
        args_id = kwargs.pop("args", None)
        args_loc = key_locs.pop("args", trainer.loc)
        # fgc's own settings pass through first, so a mapped argument that repeats one is an error
        for key in list(kwargs):
            if key in self.fields and key not in TRAINER_KEYWORDS:
                trainer.kwargs[key] = kwargs.pop(key)
                trainer.key_locs[key] = key_locs.get(key, trainer.loc)
        for key, nid in kwargs.items():
            loc = key_locs.get(key, trainer.loc)
            rule = TRAINER_KEYWORDS.get(key)
            if isinstance(rule, str):
                if self.ir.targets.get(rule) != nid:
                    self.error(loc, f"{self.label}: argument {key!r} must be the config's {rule!r} target, "
                               f"which fgc reads", f"write {rule}: at the top level and {key}: *{rule}")
                continue
            instead = rule.text if isinstance(rule, Instead) else (
                f"remove it (fgc's {self.cls.__name__} takes {', '.join(sorted(self.fields))})")
            self.error(loc, f"{self.label}: argument {key!r} has no fgc equivalent; {instead}")
        self.args_label = self.label
        self.written: set[str] = set()
        if args_id is not None:
            args = self.ir.node(args_id)
            if args.kind != "call" or args.spec not in ARGS_CLASSES:
                self.error(args_loc, f"{self.label}: 'args' must be a Forgather trainer-arguments class "
                           f"({ARGS_CLASSES[0]})")
            else:
                self.args_label = args.spec
                self.map_args(args)
                self.drop(args)
        trainer.spec = f"fgc.settings:{self.cls.__name__}"
        self.ir.link(trainer)

    def drop(self, args: Node) -> None:
        """Remove the arguments node: its values now hang from the trainer."""
        for name in [t for t, nid in self.ir.targets.items() if nid == args.id]:
            del self.ir.targets[name]
        for name in [t for t, nid in self.ir.definitions.items() if nid == args.id]:
            del self.ir.definitions[name]
        if self.ir.uses(args.id) <= 1:
            self.ir.g.remove_node(args.id)
            self.trainer.kwargs.pop("args", None)
        else:
            self.error(args.loc, f"{args.spec} is used elsewhere than as the trainer's args",
                       "fgc reads its values as the trainer's settings; refer to it only from args:")

    def map_args(self, args: Node) -> None:
        self.written = set(args.kwargs)
        if args.args:
            self.error(args.loc, f"{args.spec}: positional arguments have no fgc equivalent")
        for key, value in FORGATHER_DEFAULTS.items():
            # a default stands where neither the arguments nor the trainer's own settings set it
            if key not in args.kwargs:
                args.kwargs[key] = self.new_value(args.id, "default." + key, value, args.loc)
        rules: dict[str, list[str]] = {}
        for key, nid in args.kwargs.items():
            loc = args.key_locs.get(key, args.loc)
            how = ARGUMENTS.get(key)
            if how is None:
                self.error(loc, f"{args.spec}: argument {key!r} is not a Forgather training argument fgc knows",
                           "remove it")
            elif isinstance(how, Instead):
                self.error(loc, f"{args.spec}: argument {key!r} has no fgc equivalent; {how.text}")
            elif how.pipeline_only and self.cls is not PipelineTrainer:
                self.error(loc, f"{args.spec}: argument {key!r} applies to the pipeline trainer only",
                           "remove it")
            elif how.rule is None:
                self.set(how.path, nid, loc, key)
            else:
                rules.setdefault(how.rule, []).append(key)
        for rule in rules:
            _RULES[rule.split(":")[0]](self, args, rule)

    # -- the rules of arguments that do not map one to one
    def loc_of(self, args: Node, key: str) -> Location:
        return args.key_locs.get(key, args.loc)

    def number(self, args: Node, key: str, default: Any) -> Any:
        """The literal value of argument KEY (DEFAULT when absent); an error and None when it is
        not a literal."""
        if key not in args.kwargs:
            return default
        value = self.literal(args.kwargs[key])
        if value is _NOT_LITERAL:
            self.error(self.loc_of(args, key), f"{args.spec}: argument {key!r} must be a literal value "
                       "for fgc to map it")
            return None
        return value


_NOT_LITERAL = object()


def _max_steps(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "max_steps", None)
    loc = p.loc_of(args, "max_steps")
    if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        p.error(loc, f"{args.spec}: argument 'max_steps' {value} (train by epochs) has no fgc equivalent; "
                "write a positive max_steps")
        return
    p.set(("max_steps",), args.kwargs["max_steps"], loc, "max_steps")


def _seed(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "seed", None)
    loc = p.loc_of(args, "seed")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        p.error(loc, f"{args.spec}: argument 'seed' {value} (a random seed) has no fgc equivalent; "
                "write a seed >= 0 (or train.py --seed N)")
        return
    p.set(("seed",), args.kwargs["seed"], loc, "seed")


def _batch(p: _Port, args: Node, rule: str) -> None:
    """Forgather's batch is per device and per forward; fgc's batch_size is the global batch of an
    optimizer step: per_device x gradient_accumulation_steps x data-parallel ranks."""
    if not p.written & {"per_device_train_batch_size", "gradient_accumulation_steps"} and p._is_set(("batch_size",)):
        return  # the trainer's own batch_size stands over Forgather's default
    per_device = p.number(args, "per_device_train_batch_size", 16)
    accum = p.number(args, "gradient_accumulation_steps", 1)
    if per_device is None or accum is None:
        return
    key = "per_device_train_batch_size" if "per_device_train_batch_size" in args.kwargs else "gradient_accumulation_steps"
    loc = p.loc_of(args, key)
    for name, value in (("per_device_train_batch_size", per_device), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            p.error(p.loc_of(args, name), f"{args.spec}: argument {name!r} must be a positive integer, got {value!r}")
            return
    ranks = _data_ranks(p)
    if ranks is None:
        return
    p.set(("batch_size",), p.new_value(args.id, "batch_size", per_device * accum * ranks, loc), loc, key)
    if p.cls is not PipelineTrainer:
        p.set(("micro_batch_size",), p.new_value(args.id, "micro_batch_size", per_device, loc), loc, key)


def _data_ranks(p: _Port) -> int | None:
    """The data-parallel ranks the trainer's ``parallel`` settings give (their defaults when the
    config writes none)."""
    if p.cls is BasicTrainer:
        return 1
    pid = p.trainer.kwargs.get("parallel")
    default = p.cls.__dataclass_fields__["parallel"].default_factory()
    names = ("data_degree",) if p.cls is PipelineTrainer else ("nproc", "tensor_degree")
    values = {n: getattr(default, n) for n in names}
    if pid is not None:
        pnode = p.ir.node(pid)
        for n in names:
            if n in pnode.kwargs:
                value = p.literal(pnode.kwargs[n])
                if not isinstance(value, int):
                    p.error(pnode.key_locs.get(n, pnode.loc), f"parallel.{n} must be a literal integer for fgc to "
                            "turn per_device_train_batch_size into the global batch_size")
                    return None
                values[n] = value
    if p.cls is PipelineTrainer:
        return values["data_degree"]
    return max(1, values["nproc"] // values["tensor_degree"])


def _max_eval_steps(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "max_eval_steps", -1)
    loc = p.loc_of(args, "max_eval_steps")
    if isinstance(value, int) and value <= 0:
        p.error(loc, f"{args.spec}: argument 'max_eval_steps' {value} (the whole eval set) has no fgc "
                "equivalent; write a positive max_eval_steps (fgc's eval_batches)")
        return
    p.set(("logging", "eval_batches"), args.kwargs["max_eval_steps"], loc, "max_eval_steps")


def _strategy(
    p: _Port, args: Node, strategy_key: str, steps_key: str, path: tuple[str, str], off: str, default: str
) -> None:
    """Forgather's ``*_strategy`` + ``*_steps`` pair: "steps" keeps the steps, "no" is fgc's 0."""
    strategy = p.number(args, strategy_key, default)
    if strategy is None:
        return
    loc = p.loc_of(args, strategy_key)
    if strategy == "no":
        if steps_key in args.kwargs and args.key_locs.get(steps_key) is not None:
            written = "" if strategy_key in args.kwargs else " (Forgather's default)"
            p.error(p.loc_of(args, steps_key), f"{args.spec}: argument {steps_key!r} has no effect with "
                    f"{strategy_key} \"no\"{written}", f"remove it, or write {strategy_key}: steps")
            return
        p.set(path, p.new_value(args.id, path[-1], 0, loc), loc, strategy_key)
    elif strategy == "steps":
        if steps_key in args.kwargs:
            p.set(path, args.kwargs[steps_key], p.loc_of(args, steps_key), steps_key)
    else:
        p.error(loc, f"{args.spec}: argument {strategy_key!r} {strategy!r} has no fgc equivalent; "
                f"write {strategy_key}: steps with {steps_key} ({off})")


def _eval(p: _Port, args: Node, rule: str) -> None:
    # Forgather's default eval_strategy is "no": eval_steps alone does nothing there
    _strategy(p, args, "eval_strategy", "eval_steps", ("logging", "eval_every"), "fgc evaluates every N steps", "no")


def _save(p: _Port, args: Node, rule: str) -> None:
    # fgc always writes a checkpoint at the end; save_every 0 writes only that one
    _strategy(p, args, "save_strategy", "save_steps", ("checkpoint", "save_every"), "fgc saves every N steps", "steps")


def _logging_strategy(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "logging_strategy", "steps")
    if value not in (None, "steps"):
        p.error(p.loc_of(args, "logging_strategy"), f"{args.spec}: argument 'logging_strategy' {value!r} has no "
                "fgc equivalent; write logging_strategy: steps with logging_steps")


def _optimizer(p: _Port, args: Node, rule: str) -> None:
    """An optimizer argument of TrainingArguments reaches the 'optimizer' target's keyword when the
    target does not set it (Forgather's own optimizer factory would ignore it otherwise)."""
    fgc_key = rule.split(":")[1]
    key = {"lr": "learning_rate", "weight_decay": "weight_decay", "eps": "adam_epsilon"}[fgc_key]
    loc = p.loc_of(args, key)
    oid = p.ir.targets.get("optimizer")
    onode = p.ir.node(oid) if oid is not None else None
    if onode is None or onode.kind != "call":
        p.error(loc, f"{args.spec}: argument {key!r} sets the 'optimizer' target's {fgc_key}, and the config "
                "has no optimizer call", f"write optimizer: !partial:torch.optim:AdamW {{{fgc_key}: ...}}")
        return
    if fgc_key in onode.kwargs:
        p.error(loc, f"{args.spec}: argument {key!r} has no effect: the optimizer sets {fgc_key} at "
                f"{onode.key_locs.get(fgc_key, onode.loc)}", "remove it")
        return
    onode.kwargs[fgc_key] = args.kwargs[key]
    onode.key_locs[fgc_key] = loc
    p.ir.link(onode)


def _schedule(p: _Port, args: Node, rule: str) -> None:
    """lr_scheduler_type and warmup_steps make the 'lr_scheduler' target when the config has none."""
    keys = [k for k in ("lr_scheduler_type", "warmup_steps") if k in args.kwargs]
    if "lr_scheduler" in p.ir.targets:
        for key in keys:
            p.error(p.loc_of(args, key), f"{args.spec}: argument {key!r} has no effect: the 'lr_scheduler' "
                    f"target sets the schedule at {p.ir.node(p.ir.targets['lr_scheduler']).loc}",
                    "remove it, or set it in the lr_scheduler target")
        return
    kind = p.number(args, "lr_scheduler_type", "constant" if "lr_scheduler_type" not in args.kwargs else None)
    if kind is None:
        return
    loc = p.loc_of(args, keys[0])
    if kind not in _SCHEDULES:
        p.error(p.loc_of(args, "lr_scheduler_type"), f"{args.spec}: argument 'lr_scheduler_type' {kind!r} has no "
                "fgc equivalent; write lr_scheduler_type cosine or constant, or an 'lr_scheduler' target "
                "(fgc_runtime.train: warmup_cosine, constant, warmup_stable_decay, infinite_lr)")
        return
    sid = f"{args.id}.fgc_lr_scheduler"
    node = Node(sid, "call", loc, mode="partial", spec=f"fgc_runtime.train:{_SCHEDULES[kind]}")
    if "warmup_steps" in args.kwargs:
        node.kwargs["warmup"] = args.kwargs["warmup_steps"]
        node.key_locs["warmup"] = p.loc_of(args, "warmup_steps")
    elif _SCHEDULES[kind] != "constant":
        node.kwargs["warmup"] = p.new_value(args.id, "warmup", 0, loc)
    if _SCHEDULES[kind] != "constant":
        if "max_steps" not in args.kwargs:
            p.error(loc, f"{args.spec}: lr_scheduler_type {kind!r} needs max_steps (the schedule's total)")
            return
        node.kwargs["total"] = args.kwargs["max_steps"]
        node.key_locs["total"] = p.loc_of(args, "max_steps")
    p.ir.add(node)
    p.ir.link(node, fresh=True)
    p.ir.targets["lr_scheduler"] = sid


def _activation_checkpointing(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "gradient_checkpointing", False)
    if value is None:
        return
    loc = p.loc_of(args, "gradient_checkpointing")
    nid = p.new_value(args.id, "activation_checkpointing_mode", "full" if value else "none", loc)
    p.set(("activation_checkpointing", "mode"), nid, loc, "gradient_checkpointing")


def _use_cpu(p: _Port, args: Node, rule: str) -> None:
    value = p.number(args, "use_cpu", False)
    if value:
        loc = p.loc_of(args, "use_cpu")
        p.set(("device",), p.new_value(args.id, "device", "cpu", loc), loc, "use_cpu")


_RULES = {
    "max_steps": _max_steps,
    "seed": _seed,
    "batch": _batch,
    "max_eval_steps": _max_eval_steps,
    "eval": _eval,
    "save": _save,
    "logging_strategy": _logging_strategy,
    "optimizer": _optimizer,
    "schedule": _schedule,
    "activation_checkpointing": _activation_checkpointing,
    "use_cpu": _use_cpu,
}


def port_forgather_trainers(ir: IRGraph, ctx: LoweringContext) -> IRGraph:
    """Rewrite every Forgather trainer node of IR into fgc's trainer settings, in place; errors for
    arguments without an fgc equivalent go to ``ctx.sink``. Returns IR."""
    trainers = [n for n in ir.nodes() if n.kind == "call" and n.spec in TRAINERS]
    for node in sorted(trainers, key=lambda n: n.id):
        _Port(ir, ctx, node).run()
    for node in sorted(ir.nodes(), key=lambda n: n.id):
        if node.kind == "call" and node.spec in ARGS_CLASSES:
            ctx.sink.error(f"{node.spec} is read only as a Forgather trainer's args", node.loc,
                           "write trainer: !singleton:forgather.ml.trainer:Trainer {args: *trainer_args}")
            ir.g.remove_node(node.id)
            for table in (ir.targets, ir.definitions):
                for name in [t for t, nid in table.items() if nid == node.id]:
                    del table[name]
    return ir
