"""Codegen driver: a lowered config → the files of a standalone training package.

File skeletons are jinja2 templates in ``codegen_templates/``; the code that goes into them is built
with libcst (:mod:`fgc.codegen.emit`, :mod:`fgc.codegen.vendor`) and every ``.py`` file is
formatted with black. Nothing here depends on the time, the machine or the output path.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Callable

import jinja2
import libcst as cst

import fgc
import fgc_codegen_templates
from fgc import cache
import fgc_runtime
from fgc.errors import Diagnostic, FgcError, Location
from fgc.frontend.templates import library_name
from fgc_lowering.program import Program
from fgc_lowering.dynamic_args import DynamicArg, check_run_time_reads, flag_nodes
from fgc_lowering.plan_diloco import describe_workers

from . import black_worker, calls
from .emit import FLAGS_PARAM, ImportTable, TargetEmitter, code, literal
from .escape import FILTERS, python_comment, python_docstring
from .features import SlotExtension, features_of
from .imports import skeleton_imports
from .vendor import VendorError, vendor_symbols

RUNTIME_DIR = Path(fgc_runtime.__file__).resolve().parent
TEMPLATES_DIR = Path(fgc_codegen_templates.__file__).resolve().parent
NOT_THIRD_PARTY = {"torch", "fgc_runtime", "functools", "model"}
# train.py constant names for settings-group fields whose own names would be ambiguous
CONSTANT_NAMES = {
    ("precision", "mode"): "PRECISION",
    ("activation_checkpointing", "mode"): "ACTIVATION_CHECKPOINTING",
    ("compile", "enabled"): "COMPILE",
    ("compile", "mode"): "COMPILE_MODE",
    ("compile", "fullgraph"): "COMPILE_FULLGRAPH",
    ("parallel", "schedule"): "PIPELINE_SCHEDULE",
    ("loss", "impl"): "LOSS_IMPL",
    ("loss", "chunk_size"): "LOSS_CHUNK_SIZE",
    ("loss", "chunk_budget_mib"): "LOSS_CHUNK_BUDGET_MIB",
    ("diloco", "inner_steps"): "DILOCO_INNER_STEPS",
    ("diloco", "outer_lr"): "DILOCO_OUTER_LR",
    ("diloco", "outer_momentum"): "DILOCO_OUTER_MOMENTUM",
    ("diloco", "workers"): "DILOCO_WORKERS",
}


# Settings whose None means "derive it": (value, where) from the settings and the plan.
RESOLVED = {
    ("logging", "eval_batch_size"): lambda s, plan: (s.batch_size, "the train batch (eval_batch_size is null)"),
    ("loss", "impl"): lambda s, plan: (
        plan.kernels["cross_entropy"]["impl"],
        "the select-kernels pass, " + plan.kernels["cross_entropy"]["reason"],
    ),
    ("parallel", "microbatches"): lambda s, plan: (
        plan.pipeline["microbatches"],
        "the plan: one per pipeline stage (microbatches is null)",
    ),
    ("parallel", "stages_per_rank"): lambda s, plan: (
        len(plan.pipeline["stages"]) // s.parallel.pipeline_degree,
        f"the plan: what the {s.parallel.schedule} schedule runs (stages_per_rank is null)",
    ),
}


def _jinja() -> jinja2.Environment:
    """The environment of the codegen templates, with the escaping filters of
    :mod:`fgc.codegen.escape` (every ``{{ }}`` that prints text uses one of them)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=[SlotExtension],
    )
    env.filters.update(FILTERS)
    return env


@functools.lru_cache(maxsize=16)
def format_python(source: str) -> str:
    """black, with its default style for Python 3.10 and later (the generated code's; a fixed
    target, so that a piece formats the same alone as in its file). A source met before is
    not formatted again: in this process (`fgc ls` and `fgc check` of configs that share a
    model generate the same model.py) or, through :mod:`fgc.cache`, in an earlier build (keyed
    by the source and black's version). black itself is imported only when a source must be
    formatted, and not at all when the build's black worker (:mod:`.black_worker`, the console
    script's) formats it: an error there formats it here, where black raises."""
    k = cache.key("black", black_worker.black_version(), "py310", source)
    formatted = cache.get("black", k)
    if formatted is None:
        worker = black_worker.current()
        formatted = worker.format(source) if worker is not None else None
        if formatted is None:
            import black

            formatted = black.format_str(source, mode=black_worker.mode(black))
        cache.put("black", k, formatted)
    return formatted


def _sync_description(plan) -> str:
    """Who syncs the gradients of a step under PLAN, for train.py's comment beside
    ``step_sync``: in words, from the runtime's own decision (``fgc_runtime.step.sync_kind``)."""
    from fgc_runtime.step import sync_kind

    group, grads, _ = sync_kind(plan.to_data())
    over = {
        "world": "every rank",
        "dp": "the data-parallel groups",
        "worker": "the ranks of each DiLoCo worker only, never between workers",
    }.get(group)
    if grads == "ddp":
        return f"DDP averages them over {over}"
    if grads == "fsdp":
        return f"FSDP2 reduces them over {over}"
    if grads == "average":
        return f"an explicit mean after the backward over {over}: DDP's semantics, whose buckets do not take tensor-parallel shards"
    if plan.diloco:
        one = "one tensor-parallel group, whose ranks read the same batch" if plan.tensor_parallel else "one rank"
        return f"not synced within a step: each DiLoCo worker is {one}, and the workers sync every DILOCO_INNER_STEPS steps"
    return "not synced: one process"


def _wrap(text: str, indent: int = 4) -> list[str]:
    """TEXT as the lines of a comment in train.py at INDENT spaces (the template adds ``# ``),
    within 96 columns."""
    return textwrap.wrap(text, 94 - indent, break_on_hyphens=False)


def _pipeline_sync_description(plan) -> str:
    """What a pipeline's step sync (``fgc_runtime.pipeline.PipelineSync``) does, for train.py's
    comment beside it."""
    sharded = "fsdp2 per stage" in plan.apply_order
    return (
        "A pipeline's, around its schedule (fgc_runtime/pipeline.py): targets and gradients summed over the "
        "data-parallel replicas" + (" (FSDP2 reduces the gradients)" if sharded else "")
        + (" of each DiLoCo worker" if plan.diloco else "")
        + ", the norm over the pipeline's stages, the loss from the ranks of the last stage."
    )


def _step_comments(plan) -> dict[str, str]:
    """The comments train.py puts beside the step sync's calls whose meaning depends on the plan:
    what a checkpoint holds (``state``), what a step's loss is (``loss``), what the step's
    totals are (``totals``) and what ends a step (``end_step``)."""
    if plan.diloco:
        state = ("A checkpoint holds the global parameters (model.pt, what --export-hf and final/ "
                 "write), the outer state (optimizer.pt) and each rank's own model, inner optimizer "
                 "and token count." + (" The global parameters and the outer state come from the "
                 "pipeline ranks of the first worker's first pipeline, merged on rank 0." if plan.pipeline else ""))
        grouped = " and ranks" if plan.diloco["ranks_per_worker"] > 1 else ""
        loss = ("No gradient sync between workers: a worker's loss is its summed token loss over its "
                f"own count of target tokens, across its micro-batches{grouped}.")
        totals = ("Global, over the workers (one small all-reduce a step): the loss summed over the "
                  "workers over their summed target count, all their tokens, the mean of their norms.")
        end_step = ("Every DILOCO_INNER_STEPS steps, and at the last step (so the final model is the "
                    "global one), the workers average their pseudo-gradients and take an outer step.")
    else:
        if plan.pipeline:
            state = ("A checkpoint holds the whole model: the pipeline ranks of the first replica send their parts, rank 0 "
                     "merges and writes them, and on resume every rank takes its stages' share.")
        elif plan.trainer_type == "fsdp2" or plan.tensor_parallel:
            state = ("A checkpoint holds the full state dicts: every rank takes part in gathering its shards, rank 0 writes "
                     "them, and on resume every rank takes its shards from them.")
        else:
            state = "A checkpoint holds the model's and the optimizer's state dicts, which rank 0 writes."
        loss = ("The loss of a step is its summed token loss over the global count of target tokens, "
                "across micro-batches and ranks; that count is known before the first backward.")
        totals = ("What the step's record and its non-finite check read: its loss sum and target "
                  "count, the run's tokens, the gradient norm.")
        end_step = "Nothing more ends a step in this plan: no outer loop runs around it."
    if plan.pipeline:
        micro = ("One micro-batch here, the whole batch (grad_accum_steps is 1): the schedule cuts it into "
                 "MICROBATCHES micro-batches of MICRO_BATCH_SIZE rows.")
    else:
        micro = "The step's grad_accum_steps micro-batches, of MICRO_BATCH_SIZE rows each."
    return {"state": state, "loss": loss, "totals": totals, "end_step": end_step, "micro": micro}


STUB = "_fgc_definition_{}"


def format_module(render: Callable[[list], str], definitions: list, verbatim=frozenset()) -> str:
    """A generated module formatted with black, its copied DEFINITIONS apart.

    RENDER(definitions) renders the module's skeleton with the given ``(file, name, source)``
    definitions in it. It is rendered with a one-line stub in place of each definition's code
    (a ``class``, ``def`` or assignment, like the code it stands for, after the same leading
    comments), so black formats the skeleton and places the blank lines around each
    definition as it would around the code; each stub is then replaced by its definition,
    formatted on its own (cached per definition), or kept as it is when its name is in
    VERBATIM (library code, black-formatted already). The result is what black makes of the
    whole module (tests/test_cache.py compares the two), in a fraction of the time: the copied
    library code is most of a model.py.
    """
    if not definitions:
        return format_python(render([]))
    stubbed, bodies = [], {}
    for i, (file, name, source) in enumerate(definitions):
        comments, code_ = _leading_comments(source)
        first = code_.lstrip()
        if first.startswith("class "):
            stub = f"class {STUB.format(i)}: ..."
        elif first.startswith(("def ", "async def ", "@")):
            stub = f"def {STUB.format(i)}(): ..."
        else:
            stub = f"{STUB.format(i)} = ..."
        stubbed.append((file, name, f"{comments}\n{stub}" if comments else stub))
        bodies[stub] = code_ if name in verbatim else _leading_comments(format_python(source + "\n"))[1]
    lines = format_python(render(stubbed)).split("\n")
    placed = [i for i, line in enumerate(lines) if line in bodies]
    if sorted(lines[i] for i in placed) != sorted(bodies):  # black moved a stub: format it all
        return format_python(render(definitions))
    for i in placed:
        lines[i] = bodies[lines[i]].rstrip("\n")
    return "\n".join(lines)


def _leading_comments(source: str) -> tuple[str, str]:
    """SOURCE split into its leading comment (and blank) lines and the code from its first
    statement on."""
    lines = source.split("\n")
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    return "\n".join(lines[:i]), "\n".join(lines[i:])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Package:
    """The files of a package, by relative path."""

    files: dict[str, bytes]

    def write(self, root: Path) -> None:
        for rel in sorted(self.files):
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.files[rel])
            if rel.endswith(".sh"):
                path.chmod(0o755)


class PackageBuilder:
    """Builds the package files for one lowered config."""

    def __init__(self, program: Program):
        self.program = program
        self.ir = program.graph
        self.config_dir = program.config.parent
        self.jinja = _jinja()
        self.third_party: set[str] = set()
        self.data_inputs: list[Path] = []  # text files tokenized into data/ (manifest inputs)

    # -- locations, as stable text --------------------------------------------------------------
    def where(self, loc: Location | None) -> str:
        """``file:line`` relative to the config's directory (library files as ``<fgc>/...``)."""
        if loc is None:
            return "?"
        return f"{self.stable_path(loc.file)}:{loc.line}" if loc.line else self.stable_path(loc.file)

    def stable_path(self, path: str | Path) -> str:
        path = Path(path)
        name = library_name(path)
        if name is not None:
            return f"<fgc>/{name}"
        return Path(os.path.relpath(path, self.config_dir)).as_posix()

    # -- pieces ---------------------------------------------------------------------------------
    def common(self) -> dict:
        plan = self.program.plan
        if plan.launcher == "torchrun":
            run = f"torchrun --nproc-per-node {plan.nproc} train.py"
            kind = {
                "fsdp2": "fully sharded (FSDP2)",
                "pipeline": "pipeline parallel",
                "diloco": "DiLoCo",
            }.get(plan.trainer_type, "DistributedDataParallel")
            description = f"{kind} over {plan.nproc} processes per node (torchrun)"
            if plan.diloco:
                description += f", syncing every {plan.diloco['inner_steps']} steps"
                if plan.diloco["ranks_per_worker"] > 1:
                    description += f": {describe_workers(plan.diloco)}"
            mesh = dict(plan.mesh)
            if "dp_replicate" in mesh:
                description += f": {mesh['dp_replicate']} copies (HSDP), each sharded over {mesh['dp_shard']} ranks"
            # (DiLoCo's workers were described above, their tensor and pipeline dimensions too)
            if plan.tensor_parallel and plan.pipeline and not plan.diloco:
                description += f": the layers of each stage split over {mesh['tp']} tensor-parallel ranks"
            elif plan.tensor_parallel and not plan.diloco:
                groups = plan.nproc // mesh["tp"]
                description += f"{',' if 'dp_replicate' in mesh else ':'} {groups} data-parallel groups x {mesh['tp']} tensor-parallel ranks"
            if plan.pipeline and not plan.diloco:
                pp, dp = mesh["pp"], mesh.get("dp", mesh.get("dp_shard"))
                description += (
                    f"{',' if plan.tensor_parallel else ':'} {len(plan.pipeline['stages'])} stages on {pp} ranks ({plan.pipeline['schedule']}"
                    f", {plan.pipeline['microbatches']} micro-batches)"
                    + (f" x {dp} {'FSDP2-sharded replicas' if 'dp_shard' in mesh else 'data-parallel'}" if dp > 1 else "")
                )
        else:
            run = "python train.py"
            description = "one process (basic trainer)"
        data = self.program.settings.data
        diloco_group = bool(plan.diloco) and plan.diloco["ranks_per_worker"] > 1
        return {
            "config_name": self.program.config.stem if self.program.config.stem != "train" else self.program.config.parent.name,
            "config_display": self.stable_path(self.program.config),
            "fgc_version": fgc.__version__,
            "plan": plan,
            "trainer_type": plan.trainer_type,
            # pipeline stages: the pipeline trainer, or DiLoCo workers of pipelines
            "pipelined": plan.pipeline is not None,
            # DiLoCo workers of several ranks: each rank syncs over the mesh's outer group (the
            # arguments of DiLoCo beyond its settings, and the comment on them)
            "diloco_args": [("outer_group", "mesh.outer_group")] if diloco_group else [],
            "diloco_comment": _wrap(calls.diloco_comment(plan)) if diloco_group else [],
            "trainer_description": description,
            # train.py's comment on the ranks' layout
            "layout_comment": _wrap(calls.layout_comment(plan)),
            # evaluate()'s comment on the batches the ranks read
            "eval_comment": _wrap(
                " ".join(
                    text
                    for text, applies in (
                        ("the ranks of a pipeline read the same batches: the ranks of its last stage give "
                         "their loss sums and counts, the others zeros;", plan.pipeline),
                        ("the ranks of a tensor-parallel group read the same batches (each is counted "
                         "TENSOR_DEGREE times in the sums below, which leaves their ratio as it is)", plan.tensor_parallel),
                    )
                    if applies
                ).rstrip(";"),
                12,
            )
            if plan.tensor_parallel or plan.pipeline
            else [],
            # train.py's comments on what the step sync (fgc_runtime/step.py) does for this plan,
            # wrapped: who syncs the gradients (none for the pipeline's schedule), what a
            # checkpoint holds, how the loss is normalised, what is logged, the step's end
            "sync_comment": _wrap(_pipeline_sync_description(plan))
            if plan.pipeline  # its schedule syncs nothing within a step
            else _wrap(f"The gradients: {_sync_description(plan)}."),
            # the step sync's constructor (a pipeline's: fgc_runtime/pipeline.py) and its arguments
            "sync_function": "pipeline.pipeline_sync" if plan.pipeline else "step_sync",
            "sync_args": calls.sync_args(plan, chunked=plan.kernels["cross_entropy"]["impl"] in ("chunked", "triton")),
            **{
                f"{name}_comment": _wrap(text, 4 if name == "state" else 8)  # the loop's: 8
                for name, text in _step_comments(plan).items()
            },
            "precision": plan.precision,
            "launcher": plan.launcher,
            "nproc": plan.nproc,
            "run_command": run,
            "train_command": "python train.py",
            # README.md's data line (the template escapes each name)
            "text_files": list(data.text_files or ()),
            "data_dir": data.data_dir,
            "ships_data": bool(data.text_files),
            "output_dir": self.program.settings.output_dir,
            # the model kernels that run in Triton (the select-kernels pass): train.py checks the device
            "triton_kernels": sorted(k for k, c in plan.kernels.items() if c["impl"] in ("triton", "mixed")),
        }

    def meta_init(self) -> bool:
        """Whether train.py builds the model on the meta device, each rank materialising only its
        share (its stages, or its FSDP2 and tensor-parallel shards), and loads only that share of
        pretrained weights: the pipeline and FSDP2 trainers with a model whose root has
        ``init_weights()`` and whose every part comes from the component library or a family folder
        (``fgc.components.*``, ``fgc.families.*``; whose init_weights gives any share the whole
        model's values)."""
        model_root = self.ir.targets["model"]
        symbol = self.program.symbols.get(model_root)
        # symbol.obj is the class the config calls: init_weights is its method
        initialises = symbol is not None and callable(getattr(symbol.obj, "init_weights", None))
        # init_weights initialises the library's parts; a part of the user's own could hold a
        # parameter it does not know, which would stay uninitialised memory after to_empty()
        library_only = all(
            not self.program.symbols[n].is_user_code
            and self.program.symbols[n].module.startswith(("fgc.components.", "fgc.families.", "torch"))
            for n in self.ir.reachable(model_root)
            if n in self.program.symbols
        )
        return self.program.plan.trainer_type in ("pipeline", "fsdp2") and initialises and library_only

    def model_py(self, common: dict) -> str:
        model_root = self.ir.targets["model"]
        symbols = [
            self.program.symbols[n] for n in self.ir.reachable(model_root) if n in self.program.symbols
        ]
        try:
            vendored = vendor_symbols(symbols, self.stable_path)
        except VendorError as exc:
            raise FgcError(str(exc), self.ir.node(model_root).loc) from None
        imports = ImportTable({"torch"})
        emitter = TargetEmitter(self.ir, self.program.symbols, imports, vendored)
        statements, var = emitter.emit("model")
        body = [code(s).strip() for s in statements]
        weights_dir, weights_where = self.pretrained()
        extra = ["from fgc_runtime.hf import load_weights"] if weights_dir is not None else []
        import_lines = sorted(set(vendored.imports) | set(imports.statements()) | set(extra), key=_import_key)
        self._note_third_party(import_lines)
        template = self.jinja.get_template("model.py.j2")
        return format_module(
            lambda definitions: template.render(
                common,
                imports=import_groups(import_lines),
                definitions=definitions,
                body=body,
                model_var=var,
                model_where=self.where(self.ir.node(model_root).loc),
                weights_dir=weights_dir,
                weights_where=weights_where,
                tensor_rules=self.tensor_rules(),
            ),
            vendored.definitions,
            vendored.verbatim,
        )

    def pretrained(self) -> tuple[str | None, str]:
        """The Hugging Face model directory the model starts from (None: fresh), and where the
        config set it."""
        model_dir = self.program.settings.pretrained.model_dir
        if model_dir is None:
            return None, ""
        trainer = self.ir.node(self.ir.targets["trainer"])
        node = self.ir.node(trainer.kwargs["pretrained"])
        origins = self.program.source.origins_of(self.ir.node(node.kwargs["model_dir"]).loc)
        loc, dvar = origins[-2] if len(origins) > 1 else origins[-1]
        return model_dir, f"{dvar} ({self.where(loc)})" if dvar else self.where(loc)

    def tensor_rules(self) -> list[dict]:
        """The tensor name rules of the pretrained model's family (``fgc.families``), where its
        checkpoint's names or layouts are not fgc's; [] without pretrained weights or rules."""
        model_dir = self.program.settings.pretrained.model_dir
        if model_dir is None:
            return []
        from fgc.families import BY_MODEL_TYPE

        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
            model_type = config.get("model_type")
        except (OSError, ValueError, AttributeError):
            return []  # hf_export() reports an unreadable config.json at its line
        family = BY_MODEL_TYPE.get(model_type)
        # a rule's groups are a field of the checkpoint's config.json (checked by hf_config())
        return [rule.to_data(config) for rule in family.tensors] if family is not None else []

    def hf_export(self) -> str | None:
        """``hf_config.json``: what ``train.py --export-hf`` writes as the model's config (see
        :mod:`fgc.hf`), decided from the model built on the meta device (None when it does not
        build: the smoke check then reports why, at the config line to blame)."""
        from fgc.hf import export_spec

        source = None
        model_dir = self.program.settings.pretrained.model_dir
        if model_dir is not None:
            config_json = Path(model_dir) / "config.json"
            try:
                source = json.loads(config_json.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                trainer = self.ir.node(self.ir.targets["trainer"])
                node = self.ir.node(self.ir.node(trainer.kwargs["pretrained"]).kwargs["model_dir"])
                raise FgcError(f"cannot read {config_json}: {exc}", node.loc) from None
            self.data_inputs.append(config_json)
        try:
            model = self.program.model_on_meta()  # the one lowering built, not a second
        except Exception:
            return None
        return json.dumps(export_spec(model, source), indent=2) + "\n"

    def constants(self) -> list[tuple[str, str, str]]:
        """Settings as (NAME, literal, where) for the top of train.py."""
        s = self.program.settings
        plan = self.program.plan
        trainer = self.ir.node(self.ir.targets["trainer"])
        cls = type(s).__name__

        def where(key: str, node=trainer, owner=cls) -> str:
            if key not in node.kwargs:
                return f"default of {owner}.{key}"
            origins = self.program.source.origins_of(self.ir.node(node.kwargs[key]).loc)
            loc, dvar = origins[-2] if len(origins) > 1 else origins[-1]  # the last setter wins
            return f"{dvar} ({self.where(loc)})" if dvar else self.where(loc)

        def group_node(group: str):
            """The config node of a settings group (None when the trainer's default is used)."""
            return self.ir.node(trainer.kwargs[group]) if group in trainer.kwargs else None

        out: list[tuple[str, str, str]] = []
        for f in fields(s):
            value = getattr(s, f.name)
            if f.name in ("data", "micro_batch_size", "pretrained"):
                continue
            if is_dataclass(value):  # a settings group: one constant per field
                node, owner = group_node(f.name), type(value).__name__
                for g in fields(value):
                    name = CONSTANT_NAMES.get((f.name, g.name), g.name.upper())
                    place = where(g.name, node, owner) if node else f"default of {cls}.{f.name}"
                    v = getattr(value, g.name)
                    if v in (None, "auto") and (f.name, g.name) in RESOLVED:  # what the plan fills in
                        v, place = RESOLVED[(f.name, g.name)](s, plan)
                    out.append((name, code(literal(v)), place))
                continue
            name = "GLOBAL_BATCH_SIZE" if f.name == "batch_size" else f.name.upper()
            out.append((name, code(literal(value)), where(f.name)))
        if s.micro_batch_size is not None:
            micro_where = where("micro_batch_size")
        elif plan.pipeline:  # the schedule's micro-batches
            micro_where = "the plan: the per-pipeline batch over MICROBATCHES micro-batches"
        else:
            micro_where = "the plan: the whole per-rank batch (micro_batch_size is null)"
        out.append(("MICRO_BATCH_SIZE", code(literal(plan.micro_batch_size)), micro_where))
        data_node = group_node("data")
        if s.data.text_files:
            data_expr = 'PACKAGE_DIR / "data"'
            data_where = "shipped in this package, made from " + ", ".join(s.data.text_files)
        else:
            data_expr = code(literal(s.data.data_dir))
            data_where = where("data_dir", data_node, "DataSettings") if data_node else "default"
        out.append(("DATA_DIR", data_expr, data_where))
        return out

    def train_py(self, common: dict, config_hash: str) -> str:
        imports = ImportTable({"torch"})
        targets = [t for t in ("optimizer", "lr_scheduler") if t in self.ir.targets]
        symbols = [
            self.program.symbols[n]
            for t in targets
            for n in self.ir.reachable(self.ir.targets[t])
            if n in self.program.symbols
        ]
        try:
            vendored = vendor_symbols(symbols, self.stable_path)
        except VendorError as exc:
            raise FgcError(str(exc), self.ir.node(self.ir.targets[targets[0]]).loc) from None
        emitter = TargetEmitter(self.ir, self.program.symbols, imports, vendored, flag_nodes(self.program.flags))
        blocks = []
        for target, var in (("optimizer", "optimizer_factory"), ("lr_scheduler", "lr_scheduler_factory")):
            if target not in self.ir.targets:
                if target == "lr_scheduler":
                    imports.modules.add("fgc_runtime.train")
                    blocks.append(
                        "# (no lr_scheduler target: a constant learning rate)\n"
                        "lr_scheduler_factory = fgc_runtime.train.constant"
                    )
                continue
            node = self.ir.node(self.ir.targets[target])
            statements, _ = emitter.emit(target, var)
            lines = [f"# {target}: {python_comment(self.where(node.loc))}"] + [code(s).strip() for s in statements]
            blocks.append("\n".join(lines))
        factories = "\n\n".join(blocks)
        if self.program.flags:
            factories = config_factories(factories, self.program.flags)
        flags = flag_arguments(self.program.flags, imports)
        settings_pretrained = self.program.settings.pretrained.model_dir is not None
        loss = self._loss_code()
        sampling = self.program.settings.logging.sample_every > 0
        settings = self.program.settings
        meta_init = self.meta_init()
        rules = bool(self.tensor_rules())

        def render(import_lines: list[str], definitions=vendored.definitions) -> str:
            return render_train(
                self.jinja,
                common,
                dict(
                    imports=import_groups(import_lines),
                    constants=constants,
                    plan_literal=code(literal(self.program.plan.to_data())),
                    parallelize_args=calls.parallelize_args(
                        self.program.plan,
                        "loss_model" if loss["chunked_loss"] else "model",
                        shard_weights=meta_init and settings_pretrained and not self.program.plan.pipeline,
                        rules=rules,
                    ),
                    stages_args=calls.stages_args(not loss["chunked_loss"], meta_init and settings_pretrained, rules),
                    stages_comment=_wrap(calls.stages_comment(self.program.plan, meta_init and settings_pretrained)),
                    parallelize_comment=_wrap(
                        calls.parallelize_comment(
                            self.program.plan,
                            materialize=meta_init and not self.program.plan.pipeline,
                            weights=settings_pretrained,
                        )
                    ),
                    model_args=calls.model_args(meta_init, self.program.plan.precision, settings_pretrained),
                    model_comment=_wrap(
                        "Built on the meta device, without memory: each rank materialises and initialises only its "
                        "share below, with the values the whole model would have."
                    )
                    if meta_init
                    else [],
                    definitions=definitions,
                    config_hash=code(literal(config_hash)),
                    factories=factories,
                    config_flags=flags,
                    flag_bool=any(a.type == "bool" and not a.action for a in self.program.flags.values()),
                    grad_clip=settings.grad_clip,
                    optimizer_in_backward=settings.optimizer_in_backward,
                    **loss,
                    pretrained=settings_pretrained,
                    model_aux_loss=self.model_aux_loss(),
                    sampling=sampling,
                    **self.optimization_flags(),
                ),
            )

        constants = self.constants()
        # the skeleton's imports are those of the names its rendered text uses
        used = skeleton_imports(render([]))
        import_lines = sorted(set(imports.statements()) | set(used) | set(vendored.imports), key=_import_key)
        self._note_third_party(import_lines)
        return format_module(lambda definitions: render(import_lines, definitions), vendored.definitions, vendored.verbatim)

    def generate_py(self, common: dict) -> str:
        """generate.py: sampling from a checkpoint, with train.py's settings of the output dir, data
        dir, context length, seed and device (the same constants, escaped the same way)."""
        wanted = ("SEQ_LEN", "SEED", "DEVICE", "OUTPUT_DIR", "DATA_DIR")
        by_name = {name: (name, value, where) for name, value, where in self.constants()}
        source = self.jinja.get_template("generate.py.j2").render(
            common,
            constants=[by_name[name] for name in wanted],
            pretrained=self.program.settings.pretrained.model_dir is not None,
        )
        return format_python(source)

    def model_aux_loss(self) -> bool:
        """Whether the model adds an auxiliary loss to the training loss (an ``aux_loss()`` method,
        of the model protocol: an MoE's load-balancing term). The pipeline trainer has none: the
        plan refuses a pipeline of a model whose aux loss is on."""
        from fgc_runtime.parallel import has_method

        if self.program.plan.pipeline:
            return False
        try:
            return has_method(self.program.model_on_meta(), "aux_loss")
        except Exception:  # a model that cannot be built was reported by the passes
            return False

    def optimization_flags(self) -> dict:
        """How train.py calls the optimizer and schedule factories: ``optimizer_param_names`` when
        the optimizer class wants named parameters (``needs_param_names``, e.g. MuonAdamW);
        ``schedule_args`` (and ``schedule_comment``): ``tokens_per_step`` when the lr schedule's
        budgets are tokens (the trainer passes its tokens per step)."""
        optimizer = self.program.symbols.get(self.ir.targets["optimizer"])
        in_tokens = False
        if "lr_scheduler" in self.ir.targets:
            node = self.ir.node(self.ir.targets["lr_scheduler"])
            unit = node.kwargs.get("budget_unit") if node.kind == "call" else None
            in_tokens = unit is not None and self.ir.node(unit).value == "tokens"
        return {
            "optimizer_param_names": bool(getattr(getattr(optimizer, "obj", None), "needs_param_names", False)),
            # the schedule factory's arguments beyond the optimizer, and the comment on them
            "schedule_args": [("tokens_per_step", "GLOBAL_BATCH_SIZE * SEQ_LEN")] if in_tokens else [],
            "schedule_comment": ["the schedule's budgets are tokens: step s is at token s * GLOBAL_BATCH_SIZE * SEQ_LEN"]
            if in_tokens
            else [],
        }

    def _loss_code(self) -> dict:
        """How train.py computes the loss: the kernel the select-kernels pass chose."""
        loss = self.program.settings.loss
        impl = self.program.plan.kernels["cross_entropy"]["impl"]
        features = bool(loss.label_smoothing or loss.z_loss or loss.softcap is not None)
        pipelined = self.program.plan.pipeline is not None
        return {
            "chunked_loss": impl in ("chunked", "triton"),
            # what train_model(input_ids, labels) gives: the loss sum and count (the loss head
            # around the model, a pipeline), or logits that the loss function takes
            "model_gives_loss": impl in ("chunked", "triton") or pipelined,
            "loss_fn": "lm_loss" if features else "loss_sum_and_count",
            "document_masking": self.program.settings.document_masking,
            "train_module": "pipe"
            if pipelined
            else "masked_model"
            if self.program.settings.document_masking
            else ("loss_model" if impl in ("chunked", "triton") else "model"),
            # what samples run: the loss head around the model where it is FSDP2's root (its
            # forward gathers the head's weight), else the model
            "sample_module": "loss_model"
            if impl in ("chunked", "triton")
            and (self.program.plan.trainer_type == "fsdp2" or (self.program.plan.diloco or {}).get("inner") == "fsdp2")
            else "model",
        }

    def _note_third_party(self, import_lines: list[str]) -> None:
        for line in import_lines:
            module = line.split()[1].split(".")[0]
            if module not in NOT_THIRD_PARTY and module not in sys.stdlib_module_names:
                self.third_party.add(module)

    def runtime_files(self, generated: dict[str, bytes]) -> dict[str, bytes]:
        """The runtime modules the GENERATED files (train.py, generate.py, model.py) reach, copied verbatim
        (they import only the standard library, torch and each other): their import closure,
        with the Triton kernels only when the plan runs some kernel in Triton (see
        :mod:`fgc.codegen.closure`)."""
        from .closure import closure, picks_triton

        sources = {rel: data.decode("utf-8") for rel, data in generated.items() if rel.endswith(".py")}
        reached = closure(sources, RUNTIME_DIR, triton=picks_triton(self.program.plan.kernels))
        return {f"fgc_runtime/{rel}": (RUNTIME_DIR / rel).read_bytes() for rel in reached}

    def data_files(self) -> dict[str, bytes]:
        """Default token shards from the config's text files (byte tokenizer), if it names any."""
        data = self.program.settings.data
        if not data.text_files:
            return {}
        from fgc.data import tokenize_to_shards

        trainer = self.ir.node(self.ir.targets["trainer"])
        data_node = self.ir.node(trainer.kwargs["data"])
        key_loc = data_node.key_locs.get("text_files", data_node.loc)
        base = Path(key_loc.file).parent
        inputs = [str(base / t) for t in data.text_files]
        for given, path in zip(data.text_files, inputs):
            if not Path(path).is_file():
                raise FgcError(f"text file {given!r} not found (looked for {path})", key_loc)
        self.data_inputs += [Path(p).resolve() for p in inputs]
        with tempfile.TemporaryDirectory() as tmp:
            tokenize_to_shards(inputs, tmp, tokenizer="byte", val_fraction=data.val_fraction)
            return {f"data/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir())}

    # -- the whole package -----------------------------------------------------------------------
    def build(self) -> Package:
        errors = check_run_time_reads(self.ir, self.program.flags)
        if errors:
            raise FgcError(diagnostics=[Diagnostic(m, loc, hint) for m, loc, hint in errors])
        common = self.common()
        config_yaml = self.program.source.text.encode("utf-8")
        config_hash = sha256(config_yaml)
        files: dict[str, bytes] = {
            "model.py": self.model_py(common).encode(),
            "train.py": self.train_py(common, config_hash).encode(),
            "generate.py": self.generate_py(common).encode(),
            "config.yaml": config_yaml,
        }
        hf_export = self.hf_export()
        if hf_export is not None:
            files["hf_config.json"] = hf_export.encode()
        files.update(self.runtime_files(files))
        files.update(self.data_files())
        files["launch.sh"] = self.jinja.get_template("launch.sh.j2").render(common).encode()
        files["README.md"] = self.jinja.get_template("README.md.j2").render(common).encode()
        requirements = ["torch>=2.4"] + sorted({distribution_of(m) for m in self.third_party})
        # What the runtime uses when it is installed, and which runs without it; one the config
        # itself imports is a requirement above instead.
        optional = [
            ("tensorboard", "TensorBoard event files in OUTPUT_DIR/tensorboard/"),
            ("jinja2", "generate.py --chat: rendering the tokenizer's chat template"),
            ("tokenizers", "generate.py and text samples during training, when the data has a Hugging Face tokenizer.json"),
            ("torchao", "train.py --export-hf DIR --quantize RECIPE"),
            ("triton", "the Triton kernels, on a CUDA GPU; the torch code runs without it"),
        ]
        requirements += [f"# optional: {name} ({why})" for name, why in optional if name not in requirements]
        files["requirements.txt"] = ("\n".join(requirements) + "\n").encode()
        files["manifest.json"] = self.manifest(files, config_hash).encode()
        return Package(files)

    def manifest(self, files: dict[str, bytes], config_hash: str) -> str:
        inputs = {}
        templates = []
        for tf in sorted(self.program.source.files.values(), key=lambda f: f.file_id):
            name = self.stable_path(tf.path)
            templates.append(f"{name}#{tf.inline_name}" if tf.inline_name else name)
            inputs.setdefault(name, sha256(tf.path.read_bytes()))
        for path in self.data_inputs:
            inputs[self.stable_path(path)] = sha256(path.read_bytes())
        data = {
            "format": "fgc-build",
            "fgc_version": fgc.__version__,
            "config": self.stable_path(self.program.config),
            "config_hash": config_hash,
            "templates": templates,
            "inputs": inputs,
            "outputs": {rel: sha256(files[rel]) for rel in sorted(files)},
            "plan": self.program.plan.to_data(),
            "variables": {k: repr(v) for k, v in sorted(self.program.variables.items())},
            "nonreproducible": dict(sorted(self.program.source.nonreproducible.items())),
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def config_factories(factories: str, dynamic_args: dict[str, DynamicArg]) -> str:
    """The optimizer and lr_scheduler factories as a function of the parsed command line: the
    config's own flags reach them as ``flags.NAME`` (train.py's main() calls it)."""
    shown = ", ".join(a.flags[0] for a in dynamic_args.values())
    body = "\n".join(("    " + line) if line.strip() else "" for line in factories.splitlines())
    return (
        f"def config_factories({FLAGS_PARAM}):\n"
        f'    """The factories, with the values of the config\'s own flags ({python_docstring(shown)})."""\n'
        f"{body}\n"
        "    return optimizer_factory, lr_scheduler_factory\n\n\n"
        "# the config's own flags: NAME -> (flag, the value the package was built with); their\n"
        "# values are recorded in each checkpoint (a resumed run says which differ)\n"
        f"CONFIG_FLAGS = {code(literal({n: (a.flags[0], a.value) for n, a in dynamic_args.items()}))}"
    )


def flag_arguments(dynamic_args: dict[str, DynamicArg], imports: ImportTable) -> list[str]:
    """``parser.add_argument(...)`` for each of the config's own flags: its names, type, choices,
    help and, as its default, the value fgc built the package with. Every value is a literal."""
    kinds = {"int": cst.Name("int"), "float": cst.Name("float"), "str": cst.Name("str"), "bool": cst.Name("flag_bool")}
    lines = []
    for arg in dynamic_args.values():
        kwargs: list[tuple[str, cst.BaseExpression]] = []
        if arg.action:
            kwargs.append(("action", literal(arg.action)))
        elif arg.type == "path":
            imports.modules.add("os")
            kwargs.append(("type", cst.Attribute(cst.Attribute(cst.Name("os"), cst.Name("path")), cst.Name("expanduser"))))
        else:
            kwargs.append(("type", kinds[arg.type]))
        if arg.choices is not None:
            kwargs.append(("choices", literal(list(arg.choices))))
        kwargs.append(("default", literal(arg.value)))
        kwargs.append(("dest", literal(arg.name)))
        # argparse formats help with %: the config's text is escaped, the default shown
        help_text = (arg.help or f"the config's {arg.name}").replace("%", "%%") + " (default: %(default)r)"
        kwargs.append(("help", literal(help_text)))
        call = cst.Call(
            cst.Name("add_argument"),
            [cst.Arg(literal(f)) for f in arg.flags]
            + [cst.Arg(v, keyword=cst.Name(k), equal=_TIGHT) for k, v in kwargs],
        )
        lines.append(code(call))
    return lines


_TIGHT = cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace(""))


def _import_key(line: str) -> tuple:
    """Standard library first, then third party, then the package's own (fgc_runtime, model);
    by module name within a group, ``import m`` before ``from m import x``."""
    module = line.split()[1]
    top = module.split(".")[0]
    group = 0 if top in sys.stdlib_module_names else (2 if top in ("fgc_runtime", "model") else 1)
    return (group, module, line.startswith("from"), line)


def import_groups(lines: list[str]) -> list[list[str]]:
    """Sorted import lines split into their groups (blank lines between groups)."""
    groups: dict[int, list[str]] = {}
    for line in sorted(set(lines), key=_import_key):
        groups.setdefault(_import_key(line)[0], []).append(line)
    return [groups[g] for g in sorted(groups)]


def distribution_of(module: str) -> str:
    """The installed distribution that provides a top-level module (``yaml`` → ``PyYAML``)."""
    import importlib.metadata

    names = importlib.metadata.packages_distributions().get(module)
    return sorted(names)[0] if names else module


def render_train(jinja: jinja2.Environment, common: dict, values: dict) -> str:
    """train.py's skeleton rendered with COMMON and VALUES, and the names it derives from them:
    the features the package has (:mod:`.features`), and the pieces of code that several of
    them share."""
    context = {**common, **values}
    definitions = context.pop("definitions")
    context.update(
        # the copied definitions, under a heading per file
        vendored_files=[
            (file, [source for _, _, source in group])
            for file, group in itertools.groupby(definitions, key=lambda d: d[0])
        ],
        # the module whose parameters the optimizer steps: the rank's stages under a pipeline
        params_module="part" if context["pipelined"] else "model",
        param_groups_args=[("with_names", "True")] if context["optimizer_param_names"] else [],
        # forward_backward's arguments beyond the micro-batch's
        forward_backward_extra=["aux_loss"] if context["model_aux_loss"] else [],
        # the loss a pipeline's last stage applies: to hidden states with the loss head
        pipeline_loss="loss_model.loss_from_hidden" if context["chunked_loss"] else context["loss_fn"],
        # the bound of the gradient norm (None: measured, not clipped)
        clip_norm_arg="GRAD_CLIP" if context["grad_clip"] is not None else "None",
    )
    context["features"] = features_of(context)
    return jinja.get_template("train.py.j2").render(context)
