"""The peer trainers of benchmarks/trainer.py: torchtitan's Llama 3 and LitGPT's GPT of a benchmark shape, each
stepped the way its own trainer steps, with weights copied from transformers' LlamaForCausalLM.

Neither peer is a dependency of fgc: install them into a separate environment (docs/development.md, "The
trainer"). Every function here imports its peer lazily, so the module imports where neither is installed.

- torchtitan (0.3): `Llama3Model` built as `torchtitan.models.llama3`'s registry builds its flavors
  (`_build_llama3_layers`: fused wqkv, `ComplexRoPE`, its inits), with torchtitan's own
  `ScaledDotProductAttention` as the inner attention: its language-model configs only offer FlexAttention (compiled
  with max_autotune) and varlen (CUDA). The step is `Trainer.train_step`'s on one process: `zero_grad(set_to_none=
  False)`, forward with `_skip_lm_head`, the `ChunkedLossWrapper(CrossEntropyLoss)` loss its llama3 configs use (sum
  over the valid tokens / their count), backward, its `clip_grad_norm_(foreach=True)`, optimizer step, its
  `LRSchedulersContainer` step. Compiled: its `apply_compile` (each block by torch.compile, fullgraph) and the loss
  built with the same `CompileConfig` (its default components: model and loss).
- LitGPT (0.5): `litgpt.model.GPT` of a Llama `litgpt.Config`; the step is `litgpt/pretrain.py`'s `fit()` without
  Fabric (one process, one device: Fabric would only wrap the same calls): its `get_lr` into the param groups,
  forward, `chunked_cross_entropy`, backward, `clip_grad_norm_(max_norm, error_if_nonfinite=True)` as
  `fabric.clip_gradients` does, optimizer step, `zero_grad()`. Compiled: `torch.compile(model)`, as `setup()` does.

Both use the HF loop's AdamW (same lr, betas, weight decay; torch's default implementation, as LitGPT picks on a
CPU) and, for bf16-mixed, `torch.autocast("cpu", torch.bfloat16)` around the forward and the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from _table import round_ratio
# last: _loops leaves sys.path
from _loops import BETAS, LR, WEIGHT_DECAY

# peer name -> the module that tells whether it is installed
PEERS = {"torchtitan": "torchtitan", "LitGPT": "litgpt"}
MAX_NORM = 1.0
# a schedule long enough never to decay within a benchmark run: the lr stays the HF loop's
NO_DECAY_STEPS = 10**9


def installed(peer: str) -> bool:
    return importlib.util.find_spec(PEERS[peer]) is not None


def peer_line(run: dict[str, bool] | None = None) -> str:
    """Which peers are installed, and whether this run measured them (RUN: peer -> measured)."""
    run = run or {}
    parts = []
    for peer in PEERS:
        if not installed(peer):
            parts.append(f"{peer} not installed")
        else:
            parts.append(f"{peer} installed, {'measured' if run.get(peer) else 'not run'}")
    return "peers: " + ", ".join(parts)


# --- torchtitan ---------------------------------------------------------------------------------------------------


def titan_model(shape: dict, vocab: int):
    """torchtitan's Llama3Model of SHAPE (fp32, on the CPU, initialized by its own init_weights)."""
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    dim, heads = shape["hidden_size"], shape["num_attention_heads"]

    def norm():
        return RMSNorm.Config(normalized_shape=dim, eps=1e-6, param_init=llama3._NORM_INIT)

    layers = llama3._build_llama3_layers(
        n_layers=shape["num_hidden_layers"],
        dim=dim,
        n_heads=heads,
        n_kv_heads=shape["num_key_value_heads"],
        hidden_dim=shape["intermediate_size"],
        rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=shape["seq_len"], theta=10000.0, scaling="none"),
        fuse_qkv=True,
        attn_backend="flex",  # replaced below: flex is the only CPU backend its LM configs offer
    )
    layers = [
        dataclasses.replace(
            layer,
            attention_norm=norm(),
            ffn_norm=norm(),
            attention=dataclasses.replace(layer.attention, inner_attention=ScaledDotProductAttention.Config()),
        )
        for layer in layers
    ]
    config = llama3.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=llama3._EMBEDDING_INIT),
        norm=norm(),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=llama3._output_linear_init(dim)),
        layers=layers,
    )
    model = config.build()
    with torch.no_grad():
        model.init_weights()
    return model


def titan_state_dict(model, hf_state_dict: dict) -> dict:
    """HF Llama weights as torchtitan's names, by its own Llama3StateDictAdapter (q/k rows un-permuted for its
    complex RoPE; its fused wqkv merges wq/wk/wv on load)."""
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    return Llama3StateDictAdapter(model.config, None).from_hf(dict(hf_state_dict))


def titan_loop(model, batches, steps: int, autocast_dtype=None, compile: bool = False):
    """`run(n)` (tokens/s of N more steps) of torchtitan's train step on MODEL, after STEPS warm-up steps."""
    from torchtitan.components.loss import IGNORE_INDEX, ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer
    from torchtitan.config import CompileConfig
    from torchtitan.distributed import utils as dist_utils

    compile_config = CompileConfig(enable=compile)
    # apply_compile sets two dynamo flags process-wide; they are set only around this loop's steps
    flags = {"capture_scalar_outputs": True, "skip_fwd_side_effects_in_bwd_under_checkpoint": True}
    dynamo = torch._dynamo.config.patch(**flags) if compile else contextlib.nullcontext()
    if compile:
        from torchtitan.distributed.compile import apply_compile

        with torch._dynamo.config.patch(**flags):
            apply_compile(model, compile_config=compile_config, parallel_dims=SimpleNamespace(tp_enabled=False))
    loss_fn = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=model.config.vocab_size)
    ).build(compile_config=compile_config)
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    schedulers = LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0).build(
        optimizers=[optimizer], training_steps=NO_DECAY_STEPS
    )
    model.train()

    def step(i):
        ids, labels = batches(i)
        optimizer.zero_grad(set_to_none=False)  # set_to_none=disable_cuda_graphs, False by default
        global_valid_tokens = (labels != IGNORE_INDEX).sum()
        with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            pred = model(ids)
            loss, _ = loss_fn(pred, labels, global_valid_tokens)
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), MAX_NORM, foreach=True)
        optimizer.step()
        schedulers.step()

    return _timed(step, batches, steps, dynamo)


def titan_loss(model, ids, labels) -> float:
    """MODEL's loss on one batch through the chunked loss, without gradients."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss

    loss_fn = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config()).build()
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    try:
        with torch.no_grad():
            loss, _ = loss_fn(model(ids), labels, torch.tensor(labels.numel()))
    finally:
        model._skip_lm_head = False
    return loss.item()


# --- LitGPT -------------------------------------------------------------------------------------------------------


def litgpt_config(shape: dict, vocab: int):
    """A Llama `litgpt.Config` of SHAPE."""
    from litgpt import Config

    return Config(
        name="fgc-bench-llama",
        block_size=shape["seq_len"],
        vocab_size=vocab,
        padded_vocab_size=vocab,
        n_layer=shape["num_hidden_layers"],
        n_head=shape["num_attention_heads"],
        n_embd=shape["hidden_size"],
        n_query_groups=shape["num_key_value_heads"],
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=1e-6,
        mlp_class_name="LLaMAMLP",
        intermediate_size=shape["intermediate_size"],
        rope_base=10000,
    )


def litgpt_model(shape: dict, vocab: int):
    from litgpt.model import GPT

    return GPT(litgpt_config(shape, vocab))


def litgpt_state_dict(model, hf_state_dict: dict) -> dict:
    """HF Llama weights as LitGPT's names, by its own converter (q, k, v fused into attn.qkv)."""
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    state_dict = {}
    copy_weights_hf_llama(model.config, {}, state_dict, dict(hf_state_dict))
    return state_dict


def litgpt_loop(model, batches, steps: int, autocast_dtype=None, compile: bool = False):
    """`run(n)` (tokens/s of N more steps) of LitGPT's pretrain step on MODEL, after STEPS warm-up steps."""
    from litgpt.pretrain import get_lr
    from litgpt.utils import chunked_cross_entropy

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    forward = torch.compile(model) if compile else model
    model.train()

    def step(i):
        ids, labels = batches(i)
        lr = get_lr(optimizer.defaults["lr"], i, 0, NO_DECAY_STEPS, LR)  # min_lr = lr: constant, as the HF loop
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            logits = forward(ids)
            loss = chunked_cross_entropy(logits, labels)
        loss.backward()  # / gradient_accumulation_iters, 1 here
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, error_if_nonfinite=True)
        optimizer.step()
        optimizer.zero_grad()

    return _timed(step, batches, steps)


def litgpt_loss(model, ids, labels) -> float:
    from litgpt.utils import chunked_cross_entropy

    with torch.no_grad():
        return chunked_cross_entropy(model(ids), labels).item()


# --- shared -------------------------------------------------------------------------------------------------------

BUILD = {
    "torchtitan": (titan_model, titan_state_dict, titan_loss, titan_loop),
    "LitGPT": (litgpt_model, litgpt_state_dict, litgpt_loss, litgpt_loop),
}
# the row names; "{}" takes ", compile" style suffixes
ROW = {
    "torchtitan": ("torchtitan Llama3 (SDPA), train_step", "torchtitan Llama3 (SDPA), train_step, apply_compile"),
    "LitGPT": ("LitGPT GPT, pretrain step", "LitGPT GPT, pretrain step, torch.compile(model)"),
}


def _timed(step, batches, steps: int, context=None):
    position = 0

    def run(n: int) -> float:
        nonlocal position
        with context or contextlib.nullcontext():
            start = time.perf_counter()
            for i in range(position, position + n):
                step(i)
            elapsed = time.perf_counter() - start
        position += n
        ids, _ = batches(0)
        return n * ids.numel() / elapsed

    run(steps)  # warm-up (and compilation)
    return run


def hf_reference_loss(hf_model, ids, labels) -> float:
    """The HF model's mean cross-entropy of its logits on LABELS (the peers' targets)."""
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()


def same_model_check(peer: str, model, hf_model, ids, labels) -> float:
    """Copies HF_MODEL's weights into MODEL (the peer's) and returns |peer loss - HF loss| on one batch, fp32."""
    _, to_peer, peer_loss, _ = BUILD[peer]
    missing, unexpected = model.load_state_dict(to_peer(model, hf_model.state_dict()), strict=False)
    # buffers (rope caches) are the model's own; every parameter must come from HF
    params = {name for name, _ in model.named_parameters()}
    assert not (params & set(missing)), f"{peer}: parameters not mapped: {sorted(params & set(missing))}"
    assert not unexpected, f"{peer}: names the model does not have: {unexpected}"
    return abs(peer_loss(model, ids, labels) - hf_reference_loss(hf_model, ids, labels))


def goal_ratio_lines(name: str, rows: list[dict], peers) -> list[str]:
    """'fgc ahead of each peer' for shape NAME: per precision, the best fgc train.py row over each peer's best row
    (best rates), the ratio of their rounds (`round_ratio`)."""
    lines = []
    precisions = dict.fromkeys(row["precision"] for row in rows if row["shape"] == name)
    for precision in precisions:
        here = [row for row in rows if row["shape"] == name and row["precision"] == precision]
        fgc = [row for row in here if row["loop"].startswith("fgc train.py")]
        if not fgc:
            continue
        best = max(fgc, key=lambda row: row["tokens_per_s"])
        for peer in peers:
            theirs = [row for row in here if row["loop"].startswith(ROW[peer][0])]
            if not theirs:
                continue
            top = max(theirs, key=lambda row: row["tokens_per_s"])
            ratio, how = round_ratio(best, top)
            lines.append(
                f"{name}: {precision}, {best['loop']} / {top['loop']}: {ratio:.2f}x, {how} "
                f"(goal: fgc ahead, above 1.0x) -> {'met' if round(ratio, 2) > 1.0 else 'NOT met'}"  # as printed
            )
    return lines
