"""`fgc explain`: what a config builds, in numbers, and where any of its values came from.

Without a key path: exact parameter counts (of the model built on the meta device: tied weights
once), training FLOPs per token with the formula, the parallel plan, and an estimated peak memory
per rank. With a key path: the value and every template line that set or overrode it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fgc_lowering.construct import meta_model
from fgc_lowering.plan_diloco import describe_workers

from .build import Compiled
from .errors import Diagnostic, FgcError, Location, display_path

BYTES = {"fp32": 4, "bf16-mixed": 4, "bf16": 2, "fp16-mixed": 4}  # parameter (and gradient) bytes by precision
ACT_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16": 2, "fp16-mixed": 2}  # activation bytes by precision
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "RMSprop": 1}


@dataclass
class ModelFacts:
    """Counts read off the model built on the meta device."""

    total: int
    embedding: int
    matmul: int  # parameters used in matmuls: all but the input embedding (plus a tied head)
    layers: int | None
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    intermediate: int | None
    vocab: int | None
    tied: bool
    # Adafactor's second-moment elements: a row and a column mean per matrix, all of a vector
    factored: int = 0
    # parameters of the decoder layers' projections that tensor parallelism splits (q, k, v, o,
    # gate, up, down), and of one layer (all of its parameters)
    tp_split: int = 0
    layer_params: int = 0


def model_facts(compiled: Compiled) -> ModelFacts:
    """Build the model target on the meta device and count its parameters exactly."""
    import torch

    ir, ctx = compiled.ir, compiled.ctx
    try:
        model = meta_model(ir, ctx)
    except Exception as exc:
        raise FgcError(
            f"the model does not build: {type(exc).__name__}: {exc}", ir.node(ir.targets["model"]).loc
        ) from None
    from fgc_runtime.parallel import has_method, layer_tp_plan

    params = list(model.parameters())  # shared (tied) parameters appear once
    total = sum(p.numel() for p in params)
    # lookup tables (token and learned position embeddings): no matmul
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    embedding = sum(p.numel() for p in params if id(p) in embedding_ids)
    # a head tied to the embedding: a Linear whose weight is a lookup table too (used in a matmul)
    tied = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in embedding_ids]
    matmul = total - embedding + sum(w.numel() for w in tied)
    layers = list(model.decoder_layers()) if has_method(model, "decoder_layers") else []
    # the projections tensor parallelism splits: those the layers' parts name in their tp_plan
    tp_split = 0
    for block in layers:
        split = layer_tp_plan(block)
        tp_split += sum(
            p.numel() for name, module in block.named_modules() if name in split for p in module.parameters(recurse=False)
        )
    # the shape of the first layer's parts, by the sizes they declare tensor parallelism divides
    sizes: dict[str, int] = {}
    for module in layers[0].modules() if layers else ():
        for attr in getattr(module, "tp_divisible", ()):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                sizes.setdefault(attr, value)
    return ModelFacts(
        tp_split=tp_split,
        layer_params=max((sum(p.numel() for p in block.parameters()) for block in layers), default=0),
        total=total,
        embedding=embedding,
        matmul=matmul,
        layers=len(layers) if layers else getattr(model, "num_hidden_layers", None),
        hidden=getattr(model, "hidden_size", None),
        heads=sizes.get("num_attention_heads"),
        kv_heads=sizes.get("num_key_value_heads"),
        intermediate=sizes.get("intermediate_size"),
        vocab=getattr(model, "vocab_size", None),
        tied=bool(tied),
        factored=sum(
            p.shape[:-1].numel() + (p.shape[:-2] + p.shape[-1:]).numel() if p.ndim > 1 else p.numel()
            for p in params
        ),
    )


def flops_per_token(compiled: Compiled, seq_len: int) -> tuple[float | None, str]:
    """Training FLOPs per token and the formula with its numbers: the model's own count
    (``model.flops_per_token(seq_len)``, the number the trainer's MFU uses too)."""
    from fgc_runtime.parallel import has_method

    model = meta_model(compiled.ir, compiled.ctx)  # model_facts has built it (or reported why not)
    if not has_method(model, "flops_per_token"):
        return None, f"unknown: the model ({type(model).__name__}) has no flops_per_token(seq_len)"
    return model.flops_per_token(seq_len)


def memory_estimate(compiled: Compiled, facts: ModelFacts) -> dict[str, int]:
    """Estimated peak bytes per rank, by kind (one micro-batch's activations held at once)."""
    plan = compiled.ctx.plan
    settings = compiled.ctx.settings
    precision = plan.precision
    p_bytes = BYTES[precision]
    params = facts.total * p_bytes
    grads = facts.total * p_bytes
    opt_node = compiled.ir.node(compiled.ir.targets["optimizer"])
    opt_name = compiled.ctx.symbols[opt_node.id].qualname.split(".")[-1]
    states = OPTIMIZER_STATES.get(opt_name, 2)
    if opt_name == "SGD":
        momentum = compiled.ir.node(opt_node.kwargs["momentum"]).value if "momentum" in opt_node.kwargs else 0
        states = 1 if momentum else 0
    optimizer = states * facts.total * p_bytes
    symbol = compiled.ctx.symbols[opt_node.id]
    runtime_optimizer = symbol.qualname if symbol.module == "fgc_runtime.optim" else None
    if runtime_optimizer == "AdamW":  # fp32 state whatever the precision
        optimizer = 2 * facts.total * 4
    elif runtime_optimizer == "Adafactor":  # fp32: factored second moments, beta1's mean
        beta1 = compiled.ir.node(opt_node.kwargs["beta1"]).value if "beta1" in opt_node.kwargs else None
        optimizer = (facts.factored + (facts.total if beta1 is not None else 0)) * 4
    b, s = plan.micro_batch_size, settings.seq_len
    h, L = facts.hidden or 0, facts.layers or 0
    a = facts.heads or 1
    kv = (facts.kv_heads or a) * (h // a if a else 0)
    inter = facts.intermediate or 4 * h
    act = ACT_BYTES[precision]
    # tensors autograd keeps per decoder layer (elements): the two norms' inputs and outputs, the
    # rotated q and k, v, the attention output (SDPA's fused kernels keep no (s, s) matrix), and
    # the MLP's gate, up, activation and product.
    # Tensor parallelism splits q, k, v, the attention output and the MLP's four over its ranks;
    # the norms' inputs and outputs stay whole (no sequence parallelism).
    tp = plan.tensor_parallel["degree"] if plan.tensor_parallel else 1
    per_layer = b * s * (4 * h + (2 * h + 2 * kv + 4 * inter) // tp)
    # the loss head under the implementation the select-kernels pass chose
    logits = loss_head_memory(compiled, facts)[plan.kernels.get("cross_entropy", {}).get("impl", "torch")]["bytes"]
    ac = compiled.ctx.settings.activation_checkpointing
    if ac.mode != "none":
        # a checkpointed layer keeps its input (full), or also its matmul and attention outputs
        # (selective: q, k, v, the attention output, o, gate, up, down); one layer's activations
        # exist again while it is recomputed
        kept = b * s * h if ac.mode == "full" else b * s * (2 * h + (3 * h + 2 * kv + 2 * inter) // tp)
        n_ckpt = len(range(0, L, ac.every_n_layers))
        activations = (n_ckpt * kept + (L - n_ckpt) * per_layer + per_layer) * act + logits + b * s * h * act
    else:
        activations = L * per_layer * act + logits + b * s * h * act
    if not plan.pipeline and (plan.trainer_type == "fsdp2" or (plan.diloco and plan.diloco["inner"] == "fsdp2")):
        # (FSDP2 per pipeline stage: below.) Each rank holds 1/n of every parameter, gradient and
        # optimizer state, plus one gathered unit (a decoder layer, or the root) during its
        # forward and backward. With tensor parallelism FSDP shards over the n / tp data-parallel
        # ranks, and a rank's parameters are 1/tp of the split projections plus the rest
        # (embedding, norms, head) whole.
        n = dict(plan.mesh)["dp_shard"]  # HSDP: the copies each hold a whole shard set
        layer_split = facts.tp_split // L if L else 0
        layer = facts.layer_params - layer_split + layer_split // tp
        root = facts.total - L * facts.layer_params
        local = facts.total - facts.tp_split + facts.tp_split // tp
        params = local * p_bytes // n + max(layer, root) * p_bytes
        grads = local * p_bytes // n
        optimizer = int(optimizer * local / facts.total) // n if facts.total else 0
    if tp > 1 and (plan.trainer_type == "ddp" or (plan.diloco and plan.diloco["inner"] != "fsdp2")):
        # DDP x tensor parallel (or DiLoCo workers of tensor-parallel groups without FSDP2): each
        # rank holds 1/tp of the split projections and the rest whole
        local = (facts.total - facts.tp_split + facts.tp_split // tp) / facts.total if facts.total else 1
        params, grads, optimizer = (int(x * local) for x in (params, grads, optimizer))
    if plan.pipeline:
        # the busiest pipeline rank: its stages' parameters, gradients and optimizer state, and the
        # activations of the micro-batches in flight on its layers (all of them for GPipe and
        # looped BFS, which run every forward first; about one per stage for the 1F1B family)
        pp = plan.pipeline
        in_flight = pp["microbatches"] if pp["schedule"] in ("gpipe", "looped-bfs") else min(
            pp["microbatches"], len(pp["stages"])
        )
        # per layer and micro-batch (checkpointed: what the layer keeps)
        layer_act = kept * act if ac.mode != "none" else per_layer * act
        best = None
        for rank in sorted({st["rank"] for st in pp["stages"]}):
            mine = [st for st in pp["stages"] if st["rank"] == rank]
            n_params = sum(st["params"] for st in mine)
            n_layers = sum(st["layers"][1] - st["layers"][0] for st in mine)
            last = any(st["stage"] == len(pp["stages"]) - 1 for st in mine)
            acts = in_flight * n_layers * layer_act + (logits if last else 0) + b * s * h * act
            if ac.mode != "none":
                acts += per_layer * act  # one layer recomputed at a time
            ratio = n_params / facts.total if facts.total else 0
            est = (int(params * ratio), int(grads * ratio), int(optimizer * ratio), acts)
            if best is None or sum(est) > sum(best):
                best = est
        params, grads, optimizer, activations = best
        # a stage's split projections are 1/tp on each tensor-parallel rank; FSDP2 shards the rest
        # of a stage over the pipeline's replicas (plus one gathered unit, not counted here)
        local = (facts.total - facts.tp_split + facts.tp_split // tp) / facts.total if facts.total else 1
        shards = dict(plan.mesh).get("dp_shard", 1)
        params, grads, optimizer = (int(x * local) // shards for x in (params, grads, optimizer))
    out = {
        "parameters": params,
        "gradients": grads,
        "optimizer state": optimizer,
        "activations": activations,
    }
    if plan.diloco:
        # the global parameters and the outer momentum (none at momentum 0), fp32 on every worker,
        # sharded as the model when a worker shards it (a sync briefly adds 4 bytes per parameter
        # more, after the step's activations are freed)
        shards = dict(plan.mesh).get("dp_shard", 1)
        local = facts.total - facts.tp_split + facts.tp_split // tp  # tensor parallel's share
        if plan.pipeline and facts.total:  # a pipeline rank's stages only: the busiest rank's
            stages = plan.pipeline["stages"]
            most = max(sum(st["params"] for st in stages if st["rank"] == r) for r in {st["rank"] for st in stages})
            local = local * most // facts.total
        out["outer (DiLoCo)"] = (8 if plan.diloco["outer_momentum"] > 0 else 4) * local // shards
    out["total"] = sum(out.values())
    return out


def loss_head_memory(compiled: Compiled, facts: ModelFacts) -> dict[str, dict]:
    """The loss head's peak bytes for one micro-batch under each implementation, by name:
    ``{"bytes", "what", "available"}`` (``available``: None, or why the config cannot use it).

    ``torch`` materialises the micro-batch's fp32 logits, their log-softmax and its gradient.
    ``chunked`` holds one chunk's fp32 logits and their gradient at a time, and from the forward
    to the backward the gradients it computed there: the head's weight (fp32) and the hidden
    states (``fgc_runtime.kernels.cross_entropy``). ``triton`` holds the same chunks in one fp32
    buffer (its kernel writes the gradient over the logits), the same gradients, and one fp32 loss
    a token; CUDA only."""
    from fgc_lowering.passes.select_kernels import SelectKernels, head_loss_blocker
    from fgc_runtime.kernels.cross_entropy import CHUNK_BYTES_PER_LOGIT, chunk_rows

    plan, settings = compiled.ctx.plan, compiled.ctx.settings
    loss = settings.loss
    tokens = plan.micro_batch_size * settings.seq_len
    v, h = facts.vocab or 0, facts.hidden or 0
    out = {
        "torch": {
            "bytes": 3 * tokens * v * 4,
            "what": "every fp32 logit, their log-softmax and its gradient",
            "available": None,
        }
    }
    chosen = plan.kernels.get("cross_entropy", {})
    rows = chosen.get("chunk_rows") if chosen.get("impl") in ("chunked", "triton") else None
    if rows is None and v:
        budget = int(loss.chunk_budget_mib * 2**20)
        rows = loss.chunk_size or chunk_rows(v, budget)
    rows = rows or tokens
    chunk = min(rows, tokens)
    chunks = -(-tokens // rows)
    source = "chunk_size" if loss.chunk_size else f"{loss.chunk_budget_mib:g} MiB budget"
    features = {
        "label_smoothing": bool(loss.label_smoothing),
        "z_loss": bool(loss.z_loss),
        "softcap": loss.softcap is not None,
        "document_masking": settings.document_masking,
    }
    lacks = [f for f, used in features.items() if used and f not in SelectKernels._chunked_features()]
    blocker = head_loss_blocker(plan)
    if blocker:
        why = f"not here: {blocker}"
    elif lacks:
        why = "not with " + ", ".join(lacks)
    else:
        missing = SelectKernels._missing_loss_methods(compiled.ir, compiled.ctx)
        why = f"not for this model: it has no {' and no '.join(missing)}" if missing else None
    out["chunked"] = {
        "bytes": chunk * v * CHUNK_BYTES_PER_LOGIT + v * h * 4 + tokens * h * ACT_BYTES[plan.precision],
        "what": (
            (f"1 chunk of {tokens:,} tokens (the {source} allows {rows:,})" if chunks == 1 else f"{chunks:,} chunks of {rows:,} tokens ({source})")
            + ": one chunk's fp32 logits and gradient, and the head's weight and hidden-state gradients from the forward"
        ),
        "available": why,
    }
    out["triton"] = {
        "bytes": chunk * v * 4 + v * h * 4 + tokens * h * ACT_BYTES[plan.precision] + tokens * 4,
        "what": "the chunked loss's chunks in one fp32 buffer (a Triton kernel writes the gradient over the logits), "
        "the head's weight and hidden-state gradients from the forward, and each token's loss",
        "available": why or ("not on the cpu device: CUDA only" if settings.device == "cpu" else None),
    }
    return out


def vocab_growth_line(growth: dict, tied: bool) -> str:
    """What the plan's ``vocab_growth`` does, in one line: which tensors grow, from how many rows
    to how many, how the new rows start, and whose vocabulary it is."""
    what = "the embedding (tied to the head, so once)" if tied else "the embedding and the untied head"
    return (
        f"vocabulary grows from {growth['from']:,} to {growth['to']:,} rows at load ({growth['source']}): "
        f"{what} get {growth['to'] - growth['from']:,} new rows, set to {growth['new_rows']}"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# what each dimension of a mesh does, for the table
DIMENSIONS = {
    "diloco": "DiLoCo workers: no gradient sync; global parameters averaged every inner_steps steps",
    "dp_replicate": "copies of the sharded model; gradients averaged over them (HSDP)",
    "dp_shard": "FSDP2 shards parameters, gradients and optimizer state",
    "dp": "data-parallel replicas; gradients averaged (summed, for a pipeline) over them",
    "pp": "pipeline stages",
    "tp": "each layer's projections split (tensor parallel); same batch",
}


def mesh_table(mesh: tuple[tuple[str, int], ...]) -> list[str]:
    """The mesh as a table: each dimension, its degree, what it does and the ranks of rank 0's
    group along it; then each rank's coordinates (ranks are numbered row-major, the last
    dimension fastest: its ranks are neighbours)."""
    if not mesh:
        return []
    names = [name for name, _ in mesh]
    sizes = [size for _, size in mesh]
    strides = [1] * len(sizes)
    for k in range(len(sizes) - 2, -1, -1):
        strides[k] = strides[k + 1] * sizes[k + 1]
    rows = [("dimension", "degree", "ranks with rank 0", "what it does")]
    for k, name in enumerate(names):
        group = ", ".join(str(i * strides[k]) for i in range(sizes[k]))
        rows.append((name, str(sizes[k]), group, DIMENSIONS.get(name, "")))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    out = ["  mesh:"]
    out += [f"    {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    world = strides[0] * sizes[0]
    coords = [
        f"{rank}=(" + ", ".join(str(rank // strides[k] % sizes[k]) for k in range(len(sizes))) + ")"
        for rank in range(world)
    ]
    out.append(f"    rank=({', '.join(names)}): " + " ".join(coords))
    return out


def explain_summary(compiled: Compiled) -> str:
    """The text `fgc explain CONFIG` prints."""
    facts = model_facts(compiled)
    plan = compiled.ctx.plan
    settings = compiled.ctx.settings
    lines = [f"config: {display_path(str(compiled.rendered.source.path))}", "", "parameters:"]
    lines.append(f"  total          {facts.total:>14,}" + ("  (tied embedding and head counted once)" if facts.tied else ""))
    lines.append(f"  embedding      {facts.embedding:>14,}")
    lines.append(f"  non-embedding  {facts.total - facts.embedding:>14,}")
    if plan.vocab_growth:
        lines.append("  " + vocab_growth_line(plan.vocab_growth, facts.tied))
    value, formula = flops_per_token(compiled, settings.seq_len)
    lines += ["", "training FLOPs per token:", f"  {formula}"]
    lines += ["", "parallel plan:"]
    mesh = plan.mesh_text() or "none (one process)"
    lines.append(f"  trainer {plan.trainer_type}, launcher {plan.launcher}, {plan.nproc} rank(s), mesh: {mesh}")
    lines += mesh_table(plan.mesh)
    if plan.fsdp_units != "none":
        lines.append(f"  FSDP2 units: {plan.fsdp_units}")
    if plan.tensor_parallel:
        tp = plan.tensor_parallel
        lines.append(
            f"  tensor parallel over {tp['degree']} ranks, as the layers' parts declare: column-wise "
            f"{', '.join(tp['colwise']) or 'none'}; row-wise {', '.join(tp['rowwise']) or 'none'}; "
            f"whole on every rank: {tp['replicated']}"
        )
    if plan.pipeline:
        pp = plan.pipeline
        lines.append(
            f"  pipeline: {pp['schedule']} schedule, {len(pp['stages'])} stages ({pp['layout']} layout), "
            f"{pp['microbatches']} micro-batches of {plan.micro_batch_size} per step"
        )
        for st in pp["stages"]:
            first, end = st["layers"]
            parts = (["embedding"] if st["stage"] == 0 else []) + [f"layers {first}-{end - 1}"]
            if st["stage"] == len(pp["stages"]) - 1:
                parts.append("norm and head")
            lines.append(f"    stage {st['stage']} on rank {st['rank']}: {', '.join(parts)}: {st['params']:,} parameters")
    if plan.pipeline:
        lines.append(
            f"  global batch {plan.global_batch_size} x {plan.seq_len} tokens; per pipeline {plan.batch_per_rank} "
            f"= {plan.pipeline['microbatches']} micro-batches of {plan.micro_batch_size}"
        )
    else:
        lines.append(
            f"  global batch {plan.global_batch_size} x {plan.seq_len} tokens; per rank {plan.batch_per_rank} "
            f"= {plan.grad_accum_steps} micro-batch(es) of {plan.micro_batch_size}"
        )
        lines.append("  pipeline stages: none (every rank holds all layers)")
    lines.append(f"  activation checkpointing: {plan.activation_checkpointing}; compile: {plan.compile}")
    if plan.apply_order:
        lines.append("  applied in order: " + " -> ".join(plan.apply_order))
    if plan.diloco:
        d = plan.diloco
        lines.append(
            f"  DiLoCo: {describe_workers(d)}, each with its own optimizer, sync every {d['inner_steps']} steps; "
            f"outer optimizer {d['outer_optimizer']}, lr {d['outer_lr']}, momentum {d['outer_momentum']}, fp32; "
            f"loss normalised {d['loss_normalisation']}"
        )
    for kernel, choice in plan.kernels.items():
        lines.append(f"  kernel {kernel}: {choice['impl']} ({choice['reason']})")
    if "cross_entropy" in plan.kernels:
        chosen = plan.kernels["cross_entropy"]["impl"]
        tokens = plan.micro_batch_size * settings.seq_len
        lines += ["", f"loss head memory per micro-batch ({tokens:,} tokens x {facts.vocab or 0:,} vocabulary):"]
        for impl, head in loss_head_memory(compiled, facts).items():
            mark = "  (chosen)" if impl == chosen else f"  ({head['available']})" if head["available"] else ""
            lines.append(f"  {impl:<8} {_mib(head['bytes']):>12}  {head['what']}{mark}")
    memory = memory_estimate(compiled, facts)
    lines += ["", f"estimated peak memory per rank ({plan.precision}):"]
    for kind, size in memory.items():
        lines.append(f"  {kind:<16} {_mib(size):>14}")
    if compiled.ctx.dynamic_args:
        from fgc_lowering.dynamic_args import check_run_time_reads

        errors = check_run_time_reads(compiled.ir, compiled.ctx.dynamic_args)
        if errors:  # as fgc build says: a flag whose value fgc reads at build time
            raise FgcError(diagnostics=[Diagnostic(m, loc, hint) for m, loc, hint in errors])
        lines += ["", "the config's own train.py flags (dynamic_args; the default is the value built with):"]
        for arg in compiled.ctx.dynamic_args.values():
            kind = arg.action or arg.type
            sets = ", ".join(arg.nodes)
            lines.append(f"  {' '.join(arg.flags)} ({kind}, default {arg.value!r}): sets {sets}" + (f"; {arg.help}" if arg.help else ""))
    return "\n".join(lines) + "\n"


def resolve_key(compiled: Compiled, key_path: str) -> tuple[str, str | None]:
    """The node at KEY.PATH and, when it is a keyword or key of its parent, the parent's id."""
    ir = compiled.ir
    parts = key_path.split(".")
    if parts[0] not in ir.targets:
        raise FgcError(
            f"no target {parts[0]!r}", Location(str(compiled.ctx.config)), hint="targets: " + ", ".join(ir.targets)
        )
    node_id, parent = ir.targets[parts[0]], None
    for i, part in enumerate(parts[1:], start=1):
        node = ir.node(node_id)
        if part in node.kwargs:
            parent, node_id = node_id, node.kwargs[part]
        elif part.isdigit() and int(part) < len(node.args):
            parent, node_id = None, node.args[int(part)]
        elif part.startswith("arg") and part[3:].isdigit() and int(part[3:]) < len(node.args):
            parent, node_id = None, node.args[int(part[3:])]
        else:
            have = list(node.kwargs) or [str(j) for j in range(len(node.args))]
            raise FgcError(
                f"{'.'.join(parts[:i])} has no {part!r}",
                Location(str(compiled.ctx.config)),
                hint="it has: " + ", ".join(have) if have else None,
            )
    return node_id, parent


def explain_key(compiled: Compiled, key_path: str) -> str:
    """The value at KEY.PATH and every template line that set or overrode it, oldest first."""
    ir, rendered = compiled.ir, compiled.rendered
    node_id, parent = resolve_key(compiled, key_path)
    node = ir.node(node_id)
    if node.kind == "value":
        shown = repr(node.value)
    elif node.kind == "call":
        shown = f"!{node.mode}:{node.spec}"
    else:
        shown = node.kind
    lines = [f"{key_path} = {shown}"]
    key = key_path.split(".")[-1]
    history = ir.node(parent).key_history.get(key, []) if parent else []
    places: list[tuple[Location, str | None, str]] = []
    for loc in history[:-1]:  # earlier declarations the later one overrode
        places.append((loc, None, "overridden"))
    for loc, dvar in rendered.origins_of(node.loc)[:-1]:
        places.append((loc, dvar, "set"))
    places.append((node.loc, None, "written"))
    for loc, dvar, what in places:
        text = f"  {what:<10} {display_path(loc.file)}:{loc.line}"
        if dvar:
            text += f"  ({dvar})"
        lines.append(text)
    growth = getattr(compiled.ctx.plan, "vocab_growth", None)
    model = ir.node(ir.targets["model"]) if "model" in ir.targets else None
    if growth and model is not None and model.kwargs.get("vocab_size") == node_id:
        lines.append(f"  grown      from the pretrained {growth['from']:,} to {growth['to']:,} ({growth['source']})")
    return "\n".join(lines) + "\n"
