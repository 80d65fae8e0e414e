"""fgc explain: exact parameter counts, the FLOPs formula, the plan, memory, and value provenance."""

from __future__ import annotations

import re
import runpy
import sys

import pytest

from conftest import EXAMPLE, run_fgc
from fgc.build import build_package, compile_config
from fgc.explain import explain_key, explain_summary, memory_estimate, model_facts


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_equal_the_built_model(tmp_path, tied):
    compiled = compile_config(EXAMPLE, variables={"tie_word_embeddings": tied, "num_key_value_heads": 1})
    facts = model_facts(compiled)
    build_package(compiled, tmp_path / "pkg", smoke=False)
    sys.path.insert(0, str(tmp_path / "pkg"))
    try:
        model = runpy.run_path(str(tmp_path / "pkg" / "model.py"))["build_model"]()
    finally:
        sys.path.remove(str(tmp_path / "pkg"))
    unique = {id(p): p for p in model.parameters()}
    assert facts.total == sum(p.numel() for p in unique.values())
    assert facts.embedding == model.model.embed_tokens.weight.numel() == 257 * 96
    assert facts.tied is tied
    head = model.lm_head.weight.numel()
    assert facts.matmul == facts.total - facts.embedding + (head if tied else 0)
    text = explain_summary(compiled)
    assert f"total          {facts.total:>14,}" in text
    assert ("counted once" in text) is tied


def test_summary_formula_plan_and_memory():
    compiled = compile_config(EXAMPLE)
    text = explain_summary(compiled)
    facts = model_facts(compiled)
    expected = 6 * facts.matmul + 12 * 3 * 96 * 128
    assert f"6*N + 12*L*H*T = 6*{facts.matmul:,} + 12*3*96*128 = {expected:,}" in text
    assert "trainer ddp, launcher torchrun, 2 rank(s)" in text
    assert "per rank 8 = 1 micro-batch(es) of 8" in text
    memory = memory_estimate(compiled, facts)
    assert memory["parameters"] == memory["gradients"] == facts.total * 4
    assert memory["optimizer state"] == 2 * facts.total * 4  # AdamW: two fp32 states
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    bf16 = compile_config(EXAMPLE, variables={"precision": "bf16"})
    assert memory_estimate(bf16, model_facts(bf16))["parameters"] == facts.total * 2


def test_explain_key_path_shows_every_line_that_set_it():
    compiled = compile_config(EXAMPLE, variables={"batch_size": 32})
    text = explain_key(compiled, "trainer.batch_size")
    lines = text.splitlines()
    assert lines[0] == "trainer.batch_size = 32"
    assert re.match(r"  set +fgc/templates/lm/train\.yaml:\d+  \(-D batch_size=32\)", lines[1])
    assert re.match(r"  set +examples/tiny_llama/train\.yaml:\d+  \(-D batch_size=32\)", lines[2])
    assert re.match(r"  written +fgc/templates/lm/train\.yaml:\d+$", lines[3])


def test_explain_key_path_shows_yaml_overrides(tmp_path):
    cfg = tmp_path / "child.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[optimizer]\n== super()\n    lr: 0.5\n"
        "[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n    data_dir: shards\n"
    )
    text = explain_key(compile_config(cfg), "optimizer.lr")
    lines = text.splitlines()
    assert lines[0] == "optimizer.lr = 0.5"
    assert re.match(r"  overridden +fgc/templates/lm/train\.yaml:\d+$", lines[1])
    assert lines[-1].startswith("  written ") and lines[-1].endswith("child.yaml:4")


def test_explain_cli(tmp_path):
    proc = run_fgc("explain", EXAMPLE, "optimizer.lr")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "optimizer.lr = 0.003"
    bad = run_fgc("explain", EXAMPLE, "optimizer.lrr")
    assert bad.returncode == 2
    assert "error: optimizer has no 'lrr'" in bad.stderr and "lr" in bad.stderr


def test_memory_estimate_with_tensor_parallelism():
    """FSDP2 x TP: a rank holds 1/tp of the split projections and shards over the n/tp
    data-parallel ranks; the activations of the split projections shrink by tp."""
    from fgc.explain import memory_estimate, model_facts
    from fgc_lowering.construct import meta_model

    fsdp = compile_config(EXAMPLE, variables={"trainer_type": "fsdp2", "nproc": 4})
    tp = compile_config(EXAMPLE, variables={"trainer_type": "fsdp2", "nproc": 4, "tensor_degree": 2})
    assert tp.ctx.plan.tensor_parallel["degree"] == 2
    facts = model_facts(tp)
    # the split parameters, counted from the parameter names
    model = meta_model(tp.ir, tp.ctx)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    split = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[-2] in projections)
    assert facts.tp_split == split
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    root = facts.total - 3 * layer
    local = facts.total - split + split // 2
    got = memory_estimate(tp, facts)
    assert got["parameters"] == local * 4 // 2 + max(layer - split // 3 + split // 6, root) * 4
    assert got["gradients"] == local * 4 // 2
    assert got["optimizer state"] == 2 * local * 4 // 2
    plain = memory_estimate(fsdp, model_facts(fsdp))
    assert plain["parameters"] == facts.total * 4 // 4 + max(layer, root) * 4
    # per layer, the micro-batch's q, k, v, attention output and the MLP's four are halved
    b, s = tp.ctx.plan.micro_batch_size, 128
    assert fsdp.ctx.plan.micro_batch_size == 4 and b == 8  # 4 and 2 data-parallel ranks
    h, kv, inter = 96, 48, 256

    def activations(b, tp):  # L layers' tensors, the fp32 logits (3 copies), the final hidden
        return 3 * b * s * (4 * h + (2 * h + 2 * kv + 4 * inter) // tp) * 4 + 3 * b * s * 257 * 4 + b * s * h * 4

    assert plain["activations"] == activations(4, 1)
    assert got["activations"] == activations(8, 2)
