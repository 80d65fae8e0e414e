"""A decision of the plan-training pass: a vocabulary that grows.

Fine-tuning a pretrained model on token shards whose tokenizer has more ids than the model (``fgc
data --chat-template chatml`` adds ``<|im_start|>`` and ``<|im_end|>`` to a base tokenizer), the
model is built with the data's vocabulary instead, and the trainer's ``load_weights`` gives the
rows the checkpoint lacks the mean of its rows (``fgc_runtime.hf``). The plan records the growth as
``vocab_growth``: ``{"from": N, "to": M, "source": PATH, "new_rows": ...}``.

The data's vocabulary is read from ``DATA_DIR/meta.json`` at build time when that file is there
(a relative ``data_dir`` is taken relative to the working directory, as everything the build
reads); when it is not, nothing changes and the trainer checks the shards at start as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from fgc.hf import pretrained_vocab_size
from fgc.ir import IRGraph

from .context import LoweringContext

NEW_ROWS = "the mean of the old rows"


def grow_vocabulary(s, ir: IRGraph, ctx: LoweringContext) -> tuple[IRGraph, dict | None]:
    """The IR with the model's ``vocab_size`` raised to the data's, and the plan's
    ``vocab_growth`` entry (None when the model's vocabulary is the pretrained one).

    Only a model with pretrained weights grows (one trained from scratch is built with the
    vocabulary its config gives, and the trainer checks the shards against it as before), and
    only a ``vocab_size`` the config writes as a number. A model whose ``vocab_size`` the config
    already sets above the pretrained one (``-D vocab_size``) grows the same way at load time,
    and the plan records that too (its source: the config line).
    """
    model_dir = getattr(getattr(s, "pretrained", None), "model_dir", None)
    if not model_dir or "model" not in ir.targets:
        return ir, None
    model = ir.node(ir.targets["model"])
    vocab_id = model.kwargs.get("vocab_size")
    if vocab_id is None:
        return ir, None
    node = ir.node(vocab_id)
    if node.kind != "value" or not isinstance(node.value, int) or isinstance(node.value, bool):
        return ir, None
    size, source = node.value, _setter(ctx, node.loc)
    data = _data_vocab(s.data) if not s.data.text_files else None
    if data is not None and data[0] > size:
        size, source = data
        ir = _with_vocab_size(ir, model.id, vocab_id, size)
        ctx.meta_model = None  # any model built before has the old vocabulary
    pretrained = pretrained_vocab_size(model_dir)
    if pretrained is None:  # no config.json to ask: the checkpoint has the config's vocabulary
        pretrained = node.value
    if size <= pretrained:
        return ir, None
    return ir, {"from": pretrained, "to": size, "source": source, "new_rows": NEW_ROWS}


def _setter(ctx: LoweringContext, loc) -> str:
    """The line that set the value written at LOC: the knob's last setter (or its -D, as
    ``-D vocab_size=320 (FILE:LINE)``) when the line prints a knob, else LOC itself."""
    origins = ctx.origins(loc) if ctx.origins is not None else []
    if len(origins) > 1:
        loc, dvar = origins[-2]
        return f"{dvar} ({loc})" if dvar else str(loc)
    return str(loc)


def _data_vocab(data) -> tuple[int, str] | None:
    """(vocab_size, meta.json path as the config names it) of the data directory's shards;
    None when there is no readable meta.json with a positive integer ``vocab_size``."""
    if not data.data_dir:
        return None
    meta_path = Path(data.data_dir) / "meta.json"
    try:
        meta = json.loads(Path(os.path.expanduser(str(meta_path))).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the trainer reports an unreadable data directory at start, as before
    value = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return None
    return value, str(meta_path)


def _with_vocab_size(ir: IRGraph, model_id: str, vocab_id: str, size: int) -> IRGraph:
    """A copy of IR whose model takes ``vocab_size`` SIZE (a value node of its own, so that
    nothing else that shared the old value changes)."""
    ir = ir.copy()
    node = ir.node(vocab_id)
    if ir.g.in_degree(vocab_id) == 1:
        ir.add(replace(node, value=size))
        return ir
    new_id, n = f"{model_id}.vocab_size", 1
    while new_id in ir.g:
        n += 1
        new_id = f"{model_id}.vocab_size.{n}"
    ir.add(replace(node, id=new_id, value=size))
    model = ir.node(model_id)
    model.kwargs["vocab_size"] = new_id
    ir.link(model)
    return ir
