"""Choose each kernel's implementation from the trainer, the device, the dtype, the features the
config asks for, and what each implementation declares it supports
(``fgc_runtime.kernels.cross_entropy.CAPABILITIES``).

A feature the chosen implementation lacks is an error at the setting's line, never silently
dropped. The loss is chosen here (``trainer.loss.impl``): ``auto`` keeps the reference while one
micro-batch's logits are small, and past ``CHUNKED_LOSS_THRESHOLD_BYTES`` takes the Triton kernel
on ``device: cuda`` (the chunked loss's chunks, with the work between the matmuls in one Triton
kernel: measured faster than the chunked loss on an H200) and the chunked one otherwise. For both, the rows of a
chunk: as many as keep one chunk's fp32 logits and their gradient within ``loss.chunk_budget_mib``
(``fgc_runtime.kernels.cross_entropy.chunk_rows``, the function the trainer calls), unless
``loss.chunk_size`` fixes them. The chunked and Triton losses run with every trainer
(:data:`CHUNKED_LOSS_TRAINERS`) and mesh, tensor parallelism included (it keeps the head whole on
every rank), except FSDP2-sharded pipeline stages under a schedule that splits the backward
(:func:`head_loss_blocker`). The model's own kernels are those its
parts declare they run (a part class's ``kernels``, e.g. ``("rms_norm",)`` for the component
library's RMSNorm), each in the implementation the part's ``kernel_impl`` argument asks for.
"""

from __future__ import annotations

import dataclasses

from fgc.errors import Location
from fgc.ir import IRGraph
from fgc_runtime.kernels.cross_entropy import CAPABILITIES, CHUNK_BYTES_PER_LOGIT, chunk_rows

from ..context import LoweringContext
from .base import Pass

# auto picks the chunked loss when one micro-batch's fp32 logits would take at least this much
CHUNKED_LOSS_THRESHOLD_BYTES = 256 * 2**20
# trainers whose loss can run outside the model's forward (through fgc_runtime's LMHeadLoss: under
# FSDP2 it is the root, so the head's weight is gathered for the whole loss; a pipeline's last
# stage gives hidden states and the schedule's loss function applies the head; tensor parallelism
# splits only the decoder layers, so every rank computes the whole head's loss, as the reference
# does). One mesh of these trainers still cannot: see head_loss_blocker().
CHUNKED_LOSS_TRAINERS = ("basic", "ddp", "diloco", "fsdp2", "pipeline")
# the implementations that compute the head and its loss together, outside the model's forward
HEAD_LOSS_IMPLS = ("chunked", "triton")
# features the generated trainer passes to LMHeadLoss (train.py.j2): the chunked kernel supports
# soft-capping, but a chunked trainer that does not pass it would drop it
CHUNKED_LOSS_PASSED = ("bias", "ignore_index", "label_smoothing", "z_loss")
DTYPES = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16": "bfloat16", "fp16-mixed": "float16"}


def head_loss_blocker(plan) -> str | None:
    """Why PLAN's trainer cannot run a loss that computes the head outside the model's forward
    (the chunked and Triton losses, fgc_runtime's LMHeadLoss), or None when it can. Every
    implementation in ``HEAD_LOSS_IMPLS`` runs through the same trainer code (only the kernel
    differs), so the answer is the same for each."""
    if plan.trainer_type not in CHUNKED_LOSS_TRAINERS:
        return f"it computes the head outside the model's forward, which the {plan.trainer_type} trainer cannot do"
    return None


class SelectKernels(Pass):
    name = "select-kernels"
    purpose = "choose each kernel's implementation from device, dtype, features and declared capabilities"
    needs_clean_input = True

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        s, plan = ctx.settings, ctx.plan
        if s is None or plan is None:
            return ir
        trainer = ir.node(ir.targets["trainer"])
        loss_node = ir.node(trainer.kwargs["loss"]) if "loss" in trainer.kwargs else None

        def where(field: str) -> Location:
            if loss_node is None:
                return trainer.loc
            if field in loss_node.kwargs:
                return ir.node(loss_node.kwargs[field]).loc
            return loss_node.loc

        loss = s.loss
        features = [
            name
            for name, used in (
                ("label_smoothing", bool(loss.label_smoothing)),
                ("z_loss", bool(loss.z_loss)),
                ("softcap", loss.softcap is not None),
                ("document_masking", s.document_masking),
            )
            if used
        ]
        vocab = plan.vocab_growth["to"] if plan.vocab_growth else self._vocab(ir)
        logits_bytes = plan.micro_batch_size * s.seq_len * vocab * 4
        if loss.impl == "auto":
            fits = all(f in self._chunked_features() for f in features)
            big = logits_bytes >= CHUNKED_LOSS_THRESHOLD_BYTES
            if big and fits and head_loss_blocker(plan) is None:
                # the Triton kernel only where the config says CUDA: device auto may run on a CPU
                on_cuda = s.device == "cuda" and all(f in self._head_features("triton") for f in features)
                impl = "triton" if on_cuda else "chunked"
                reason = (
                    f"auto: one micro-batch's logits would take {logits_bytes / 2**20:,.0f} MiB "
                    f"(at least {CHUNKED_LOSS_THRESHOLD_BYTES // 2**20} MiB): "
                    + (
                        "on cuda, the Triton kernel, a chunk of them at a time"
                        if on_cuda
                        else "computed a chunk at a time"
                    )
                )
            else:
                impl = "torch"
                reason = "auto: " + (
                    f"one micro-batch's logits take {logits_bytes / 2**20:,.1f} MiB (under "
                    f"{CHUNKED_LOSS_THRESHOLD_BYTES // 2**20} MiB): the reference"
                    if not big
                    else "the reference (the chunked kernel does not support "
                    + ", ".join(f for f in features if f not in self._chunked_features())
                    + ")"
                    if not fits
                    else f"the reference (the chunked loss cannot run here: {head_loss_blocker(plan)})"
                )
            head = self._missing_loss_methods(ir, ctx) if impl in HEAD_LOSS_IMPLS else []
            if head:
                # a head that scales or soft-caps its logits (Granite, Gemma 2): auto keeps the reference
                reason = f"auto: the reference (the {impl} kernel cannot compute this model's head: it has no {' and no '.join(head)})"
                impl = "torch"
        else:
            impl, reason = loss.impl, "chosen in the config"
        caps = CAPABILITIES[impl]
        supported = self._head_features(impl) if impl in HEAD_LOSS_IMPLS else caps["features"]
        missing = [f for f in features if f not in supported]
        for f in missing:
            ctx.sink.error(
                f"the {impl} loss kernel does not support {f}: it would be dropped",
                where(f),
                hint=f"{impl} supports " + ", ".join(supported) + "; use impl: torch",
            )
        if DTYPES[plan.precision] not in caps["dtypes"]:
            ctx.sink.error(f"the {impl} loss kernel does not support {DTYPES[plan.precision]}", where("impl"))
        if s.device != "auto" and s.device not in caps["devices"]:
            ctx.sink.error(f"the {impl} loss kernel does not run on {s.device}", where("impl"))
        blocker = head_loss_blocker(plan) if impl in HEAD_LOSS_IMPLS else None
        if blocker is not None:
            ctx.sink.error(f"the {impl} loss cannot run here: {blocker}", where("impl"), hint="use impl: torch")
        missing = self._missing_loss_methods(ir, ctx) if impl in HEAD_LOSS_IMPLS else []
        if missing:
            ctx.sink.error(
                f"the {impl} loss needs a model with hidden_states() and output_projection() (the "
                f"component library's CausalLM has them); this model has no {' and no '.join(missing)}",
                where("impl"),
                hint="use impl: torch",
            )
        if impl not in HEAD_LOSS_IMPLS and loss_node is not None:
            # the chunk's settings size the chunked and Triton kernels only: set for the reference,
            # they would be silent
            for knob in ("chunk_size", "chunk_budget_mib"):
                if knob in loss_node.kwargs:
                    ctx.sink.error(
                        f"{knob} has no effect with the {impl} loss ({reason}): it sizes the chunked and "
                        "Triton losses' chunks",
                        where(knob),
                        hint="remove it, or use impl: chunked",
                    )
        choice = {"impl": impl, "reason": reason}
        if impl in HEAD_LOSS_IMPLS:
            chunking = self._chunking(loss, vocab, ctx, where)
            choice |= chunking | {"reason": reason + chunking.get("reason", "")}
        if ctx.sink.errors:
            return ir
        kernels = {"cross_entropy": choice}
        model_kernels = self._model_kernels(ir, ctx)
        if ctx.sink.errors:
            return ir
        ctx.plan = dataclasses.replace(plan, kernels=kernels | model_kernels)
        return ir

    @staticmethod
    def _model_kernels(ir: IRGraph, ctx: LoweringContext) -> dict:
        """The model's kernels, by name: those the parts' classes declare (``kernels``), each in
        the implementation the parts' ``kernel_impl`` arguments ask for.

        A kernel some components run in Triton and others in torch is ``mixed``. Triton with
        ``torch.compile``, or on a CPU-only run, is an error at the ``kernel_impl`` line.
        """
        s = ctx.settings
        chosen: dict[str, set[str]] = {}
        triton_locs: list[Location] = []
        for node_id in ir.reachable(ir.targets["model"]):
            node = ir.node(node_id)
            symbol = ctx.symbols.get(node_id)
            declared = getattr(symbol.obj, "kernels", ()) if symbol is not None and isinstance(symbol.obj, type) else ()
            if node.kind != "call" or not declared:
                continue
            child = node.kwargs.get("kernel_impl")
            value = ir.node(child).value if child is not None else "auto"
            for kernel in declared:
                chosen.setdefault(kernel, set()).add(value)
            if value == "triton":
                triton_locs.append(ir.node(child).loc)
        for loc in triton_locs[:1]:  # one error for the knob, not one per component
            if s.compile.enabled:
                ctx.sink.error(
                    "kernel_impl triton with compile: torch.compile generates its own fused kernels "
                    "for RMSNorm, SwiGLU and rotary, and fgc's Triton kernels are not tested under it",
                    loc,
                    hint="use kernel_impl auto with compile, or turn compile off",
                )
            if s.device == "cpu":
                ctx.sink.error("kernel_impl triton: fgc's Triton kernels run on CUDA, and this config's device is cpu", loc)
        out = {}
        for kernel, impls in sorted(chosen.items()):
            if impls == {"auto"}:
                out[kernel] = {"impl": "torch", "reason": "auto: the torch code; the Triton kernels are opt-in, kernel_impl: triton"}
            elif len(impls) == 1:
                out[kernel] = {"impl": impls.pop(), "reason": "chosen in the config, kernel_impl"}
            elif "triton" in impls:
                out[kernel] = {"impl": "mixed", "reason": "triton in some components, torch in others"}
            else:  # auto and torch: the same code
                out[kernel] = {"impl": "torch", "reason": "chosen in the config, kernel_impl"}
        return out

    @staticmethod
    def _chunked_features() -> tuple[str, ...]:
        """The features a config may ask of the chunked loss: what the kernel supports and the
        generated trainer passes to it."""
        return SelectKernels._head_features("chunked")

    @staticmethod
    def _head_features(impl: str) -> tuple[str, ...]:
        """The features a config may ask of IMPL, one of ``HEAD_LOSS_IMPLS`` (the loss run by
        fgc_runtime's LMHeadLoss): what the kernel supports and the generated trainer passes to it."""
        return tuple(f for f in CAPABILITIES[impl]["features"] if f in CHUNKED_LOSS_PASSED)

    @staticmethod
    def _chunking(loss, vocab: int, ctx: LoweringContext, where) -> dict:
        """The chunked (and Triton) loss's chunk, for the plan: ``chunk_budget_mib`` and ``chunk_rows`` (the
        rows the trainer's ``chunk_rows(vocab, budget)`` gives, or the config's ``chunk_size``),
        with the reason's addition saying which. An error when the budget cannot hold one row."""
        budget = int(loss.chunk_budget_mib * 2**20)
        row_bytes = vocab * CHUNK_BYTES_PER_LOGIT
        out = {"chunk_budget_mib": loss.chunk_budget_mib}
        if loss.chunk_size is not None:
            out["chunk_rows"] = loss.chunk_size
            size = f"; chunks of {loss.chunk_size:,} tokens (chunk_size)"
            if vocab:
                size += f": {loss.chunk_size * row_bytes / 2**20:,.1f} MiB of fp32 logits and gradient each"
            out["reason"] = size
        elif not vocab:
            out["chunk_rows"] = None
            out["reason"] = (
                f"; chunks within {loss.chunk_budget_mib:g} MiB of fp32 logits and gradient, their rows "
                "from the vocabulary at run time (unknown at build time)"
            )
        elif budget < row_bytes:
            ctx.sink.error(
                f"chunk_budget_mib {loss.chunk_budget_mib:g} cannot hold one token's fp32 logits and their "
                f"gradient ({vocab:,} x {CHUNK_BYTES_PER_LOGIT} bytes = {row_bytes / 2**20:g} MiB)",
                where("chunk_budget_mib"),
                hint=f"use at least {row_bytes / 2**20:g}",
            )
        else:
            rows = chunk_rows(vocab, budget)
            out["chunk_rows"] = rows
            out["reason"] = (
                f"; chunks of {rows:,} tokens: {loss.chunk_budget_mib:g} MiB (chunk_budget_mib) // "
                f"({vocab:,} logits x {CHUNK_BYTES_PER_LOGIT} bytes, fp32 and gradient)"
            )
        return out

    @staticmethod
    def _vocab(ir: IRGraph) -> int:
        model = ir.node(ir.targets["model"])
        child = model.kwargs.get("vocab_size")
        value = ir.node(child).value if child is not None else None
        return value if isinstance(value, int) else 0

    @staticmethod
    def _missing_loss_methods(ir: IRGraph, ctx: LoweringContext) -> list[str]:
        """The methods the chunked loss calls (fgc_runtime's LMHeadLoss) that the model lacks."""
        from fgc_runtime.parallel import has_method

        from ..construct import meta_model

        try:
            model = meta_model(ir, ctx)
        except Exception:
            return []  # the smoke check reports a model that does not build
        missing = [f"{m}()" for m in ("hidden_states", "output_projection") if not has_method(model, m)]
        if not missing and model.output_projection() is None:
            missing.append("output_projection() of a plain linear head (its head scales or soft-caps the logits)")
        return missing
