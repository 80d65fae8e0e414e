"""The GPT-2 family (fgc/families/gpt2, lm/gpt2.yaml) against transformers' GPT2LMHeadModel.

Tiny random models made with transformers' GPT2Config (no downloads), saved with save_pretrained
so that their checkpoints hold GPT-2's fused, transposed `c_attn` (transformers' Conv1D) under
`transformer.`: the family's tensor rules split and transpose them on the way in and join them on
the way out. Logits are compared in fp32 at atol 1e-5 for each feature (a tied or untied head,
learned positions, each activation it accepts, scale_attn_weights off,
scale_attn_by_inverse_layer_idx).

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import EXAMPLE, REPO, line_of, run_fgc
from family_checks import logged_losses as _losses
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES
from fgc.hf import export_spec
from fgc_runtime import safetensors as st
from fgc_runtime.hf import TensorMap, load_weights
from fgc_runtime.parallel import apply_activation_checkpointing
from test_families import _build, _hf_fields, _hf_model, _ids, _import_model

SPEC = FAMILIES["gpt2"]
RULES = [rule.to_data() for rule in SPEC.tensors]
FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
# GPT2Config's token ids (50256) would be outside the tiny vocabularies
SMALL = dict(
    vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
    attn_implementation="eager",
)
CASES = {
    "defaults (gelu_new, tied)": dict(),
    "untied, relu, n_inner": dict(tie_word_embeddings=False, activation_function="relu", n_inner=80),
    "inverse layer idx, exact gelu": dict(scale_attn_by_inverse_layer_idx=True, activation_function="gelu"),
    "unscaled, silu": dict(scale_attn_weights=False, activation_function="silu"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh", n_inner=48),
    "gelu_fast, untied": dict(activation_function="gelu_fast", tie_word_embeddings=False),
    "gelu_accurate": dict(activation_function="gelu_accurate"),
    "gelu_python": dict(activation_function="gelu_python"),
    "swish, unscaled, inverse layer idx": dict(activation_function="swish", scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False),
}


def _pair(tmp_path: Path, **overrides):
    """A random transformers GPT-2 saved to TMP_PATH/hf, and fgc's gpt2 template built from its
    config.json with its weights loaded through the family's tensor rules."""
    config = GPT2Config(**SMALL, **overrides)
    hf = _hf_model(GPT2LMHeadModel, config)
    with torch.no_grad():  # sharper attention than 0.1-scale weights give, so its scale shows
        for block in hf.transformer.h:
            block.attn.c_attn.weight.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    # seq_len within n_positions (64): the learned positions must cover it
    package = _build(tmp_path, "gpt2", {"hf_fields": _hf_fields(config), "seq_len": 64})
    ours = _import_model(package).build_model().eval()
    load_weights(ours, tmp_path / "hf", RULES)
    return hf, ours, package


@pytest.mark.parametrize("case", list(CASES))
def test_gpt2_logits_match_transformers(tmp_path, case):
    hf, ours, _ = _pair(tmp_path, **CASES[case])
    saved = st.load_dir(tmp_path / "hf")
    # the checkpoint is GPT-2's own: one transposed c_attn of shape (D, 3D)
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    ids_BT = _ids(97)
    with torch.no_grad():
        ref_BTV, out_BTV = hf(ids_BT).logits, ours(ids_BT)
    assert ref_BTV.abs().max() > 0.1
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    overrides = CASES[case]
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == overrides.get("tie_word_embeddings", True)
    assert ours.model.positions.weight.shape == (64, 64)
    attns = [layer.self_attn for layer in ours.model.layers]
    base = 1.0 if overrides.get("scale_attn_weights", True) is False else 16**-0.5
    inverse = overrides.get("scale_attn_by_inverse_layer_idx", False)
    assert [a.scaling if a.scaling is not None else 16**-0.5 for a in attns] == [
        base / (i + 1 if inverse else 1) for i in range(3)
    ]


def test_gpt2_features_matter(tmp_path):
    """The learned positions and the per-layer scale each change the logits, so the comparisons
    above are not vacuous."""
    hf, ours, _ = _pair(tmp_path, scale_attn_by_inverse_layer_idx=True)
    ids_BT = _ids(97)
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        for layer in ours.model.layers:
            layer.self_attn.scaling = None
        # well above the 1e-5 the comparisons allow
        assert (ours(ids_BT) - ref_BTV).abs().max() > 1e-4
        ours.model.positions.weight.zero_()
        hf.transformer.wpe.weight.zero_()
        hf.config.scale_attn_by_inverse_layer_idx = False
        for block in hf.transformer.h:
            block.attn.scaling = 16**-0.5
        torch.testing.assert_close(ours(ids_BT), hf(ids_BT).logits, atol=1e-5, rtol=0)
        assert (hf(ids_BT).logits - ref_BTV).abs().max() > 1e-3


def test_gpt2_fused_transposed_tensors_load_and_export_exactly(tmp_path):
    """fgc's state dict joined and transposed by the family's rules is the transformers
    checkpoint, tensor for tensor; a checkpoint saved without `transformer.` (GPT2Model's, as the
    original GPT-2 weights are) loads too, and the causal-mask buffers older checkpoints hold are
    ignored."""
    hf, ours, _ = _pair(tmp_path, tie_word_embeddings=False)
    theirs = hf.state_dict()
    ours_hf = TensorMap(RULES).to_hf(ours.state_dict())
    assert sorted(ours_hf) == sorted(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours_hf[name], value), name
    attn, c_attn = ours.model.layers[1].self_attn, theirs["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(attn.q_proj.weight, c_attn[:, :64].t()) and torch.equal(attn.v_proj.weight, c_attn[:, 128:].t())
    assert torch.equal(attn.k_proj.bias, theirs["transformer.h.1.attn.c_attn.bias"][64:128])
    assert torch.equal(ours.model.layers[1].mlp.up_proj.weight, theirs["transformer.h.1.mlp.c_fc.weight"].t())
    # GPT2Model's names (no prefix) with the old mask buffers, into a fresh model
    bare = {name.removeprefix("transformer."): value for name, value in theirs.items() if name != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "bare").mkdir()
    st.save_file({**bare, "lm_head.weight": theirs["lm_head.weight"]}, tmp_path / "bare" / "model.safetensors")
    fresh = _import_model(tmp_path / "pkg").build_model().eval()
    load_weights(fresh, tmp_path / "bare", RULES)
    for name, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_gpt2_packed_documents_restart_the_learned_positions(tmp_path):
    """document_ids: positions restart at each document (as transformers does given those
    position_ids), and each document attends only to itself, so its logits are those of the
    document alone."""
    hf, ours, _ = _pair(tmp_path)
    ids_BT = _ids(97, batch=1, seq=20)
    docs_BT = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed_BTV = ours(ids_BT, docs_BT)
        torch.testing.assert_close(packed_BTV[:, :8], hf(ids_BT[:, :8]).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_BTV[:, 8:], hf(ids_BT[:, 8:]).logits, atol=1e-5, rtol=0)
        # transformers with the restarted position_ids and the block-diagonal mask agrees
        positions_BT = torch.tensor([list(range(8)) + list(range(12))])
        mask_B1TS = torch.zeros(1, 1, 20, 20).masked_fill(
            ~(torch.ones(20, 20, dtype=torch.bool).tril() & (docs_BT[0, :, None] == docs_BT[0, None, :])), float("-inf")
        )
        ref_BTV = hf(ids_BT, position_ids=positions_BT, attention_mask=mask_B1TS).logits
        torch.testing.assert_close(packed_BTV, ref_BTV, atol=1e-5, rtol=0)
        assert (packed_BTV[:, 8:] - ours(ids_BT)[:, 8:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def scratch_package(tmp_path_factory):
    """The gpt2 template from scratch (its dropouts on): 3 layers of width 32, 4 heads."""
    return _build(tmp_path_factory.mktemp("gpt2"), "gpt2", {"hidden_size": 32, "num_hidden_layers": 3, "seq_len": 16})


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gpt2_activation_checkpointing_keeps_the_gradients(scratch_package, mode):
    """Recomputed layers (dropout included: the checkpoint replays its random state) give the
    gradients of the plain run."""
    build_model = _import_model(scratch_package).build_model
    ids_BT = _ids(257, batch=2, seq=9)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model()
        assert model.training and model.embedding_dropout == 0.1
        if checkpointed:
            assert apply_activation_checkpointing(model, mode=mode) == 3
        torch.manual_seed(7)
        model(ids_BT).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and "model.positions.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_gpt2_meta_device_build_gets_the_whole_models_values(scratch_package):
    """What the FSDP2 and pipeline trainers do: build on the meta device, allocate,
    init_weights() gives the values of the model built whole (the position table included, and
    GPT-2's smaller residual projections)."""
    build_model = _import_model(scratch_package).build_model
    torch.manual_seed(5)
    whole = build_model()
    torch.manual_seed(5)
    meta = build_model(device="meta")
    meta.to_empty(device="cpu")
    meta.lm_head.weight = meta.model.embed_tokens.weight
    meta.init_weights()
    for name, value in whole.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    std = whole.model.layers[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(6), rel=0.1)
    assert whole.model.positions.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_gpt2_the_position_table_lives_on_the_first_pipeline_stage(scratch_package):
    """A pipeline's first stage holds the embeddings and the learned positions (parameters, so
    held once); the others hold neither."""
    model = _import_model(scratch_package).build_model(device="meta")
    assert set(model.stage_modules(first=True, last=False)) == {"model.embed_tokens", "model.positions"}
    assert set(model.stage_modules(first=False, last=False)) == set()
    assert set(model.stage_modules(first=False, last=True)) == {"model.norm", "lm_head"}


def test_gpt2_explain_counts_the_position_table(tmp_path):
    """`fgc explain` counts the learned position table among the parameters and the embeddings,
    and leaves it (a lookup) out of the FLOPs' N."""
    args = ("-D", "family=gpt2", "-D", "num_key_value_heads=4")
    proc = run_fgc("explain", EXAMPLE, *args)
    assert proc.returncode == 0, proc.stderr
    run_fgc("build", EXAMPLE, "-o", tmp_path / "pkg", *args, check=True)
    model = _import_model(tmp_path / "pkg").build_model()
    total = sum(p.numel() for p in model.parameters())
    table = 128 * 96
    assert model.model.positions.weight.numel() == table
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["total", f"{total:,}"] for line in lines)
    assert any(line.split()[:2] == ["embedding", f"{257 * 96 + table:,}"] for line in lines)
    flops, formula = model.flops_per_token(128)
    assert f"6*{total - table:,} + 12*3*96*128" in formula and f"{flops:,.0f}" in proc.stdout


def test_gpt2_chunked_loss_is_accepted(tmp_path):
    """GPT-2's head is a plain linear map (tied to the embedding): the chunked loss applies."""
    package = _build(tmp_path, "gpt2", {"loss_impl": "chunked"})
    model = _import_model(package).build_model()
    weight, bias = model.output_projection()
    assert weight is model.model.embed_tokens.weight and bias is None


def test_gpt2_from_scratch_with_grouped_query_attention_exports_with_remote_code(tmp_path):
    """The main example defaults num_key_value_heads to the heads for GPT-2 (which has no
    grouped-query attention), so it exports as GPT2LMHeadModel; 2 key/value heads, asked for, are
    built as asked, and the export is fgc's own class (remote code), never a wrong
    GPT2LMHeadModel."""
    for kv, remote, architecture in ((2, True, "FgcForCausalLM"), (None, False, "GPT2LMHeadModel")):
        out = tmp_path / f"kv{kv}"
        flags = [] if kv is None else ["-D", f"num_key_value_heads={kv}"]
        run_fgc("build", EXAMPLE, "-o", out, "-D", "family=gpt2", *flags, check=True)
        spec = json.loads((out / "hf_config.json").read_text())
        assert spec["remote_code"] is remote and spec["config"]["architectures"] == [architecture]


def _fields(**overrides) -> dict:
    return {**_hf_fields(GPT2Config(**{k: v for k, v in SMALL.items() if k != "attn_implementation"})), **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn is True, but fgc's gpt2 template supports only False"),
        ({"add_cross_attention": True}, "add_cross_attention is True, but fgc's gpt2 template supports only False"),
        ({"activation_function": "quick_gelu"}, "activation_function is 'quick_gelu', which fgc's MLP does not have"),
        ({"n_head": 5}, "n_head (5) must divide n_embd (64)"),
        ({"n_embd": "64"}, "n_embd must be a positive integer, got '64'"),
        ({"hidden_size": 32}, "hidden_size (32) differs from n_embd (64)"),
        ({"n_inner": 0}, "n_inner must be null or a positive integer, got 0"),
        ({"n_positions": 1.5}, "n_positions must be a positive integer, got 1.5"),
        ({"resid_pdrop": 1.0}, "resid_pdrop must be a probability below 1, got 1.0"),
    ],
)
def test_gpt2_config_fields_it_cannot_represent_are_errors(overrides, message):
    problem, _ = SPEC.classify(_fields(**overrides))
    assert problem is not None and message in problem, problem


def test_gpt2_metadata_and_head_fields_are_notes(tmp_path):
    """Fields transformers' GPT2LMHeadModel does not read are ignored with a note; the
    double-heads model's summary fields are accepted (they do not change this model)."""
    fields = _fields(unsloth_version="2024.9", summary_type="mean", summary_first_dropout=0.3)
    assert SPEC.classify(fields) == (None, ["unsloth_version"])
    proc_dir = tmp_path / "hf"
    proc_dir.mkdir()
    (proc_dir / "config.json").write_text(json.dumps({**fields, "vocab_size": 300}))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={proc_dir}", "-D", "seq_len=32")
    assert proc.returncode == 0, proc.stderr
    assert "note:" in proc.stderr and "field unsloth_version ('2024.9') is ignored" in proc.stderr


def test_gpt2_the_original_gpt2_config_json_is_accepted():
    """openai-community/gpt2's config.json (written by an early transformers): n_ctx and
    task_specific_params, which transformers 5's GPT-2 does not read, are notes."""
    original = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
    }
    assert SPEC.classify(original) == (None, ["n_ctx", "task_specific_params"])


def test_gpt2_config_errors_at_the_hf_config_line(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_fields(reorder_and_upcast_attn=True)))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"examples/hf_finetune/finetune.yaml:{line_of(FINETUNE, 'hf_config(')}: error:")
    assert "reorder_and_upcast_attn is True, but fgc's gpt2 template supports only False" in first
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"max_position_embeddings": 64, "seq_len": 128}, "max_position_embeddings (64) is below seq_len (128)"),
        ({"activation_function": "quick_gelu"}, "activation_function quick_gelu is not supported"),
    ],
)
def test_gpt2_knob_errors_name_the_template_line(variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(SPEC.template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.file.endswith("template.yaml") and d.loc.line is not None


def test_gpt2_a_model_changed_from_its_config_json_is_not_exported_as_it():
    """An imported config.json's function-changing fields that a -D changed (here the
    activation) must not leave the old value in an export of GPT2LMHeadModel."""
    from fgc_lowering.construct import meta_model

    fields = _fields()
    for variables, remote in (({}, False), ({"activation_function": "relu"}, True)):
        variables = {"data_dir": "data", "hf_fields": fields, "seq_len": 64, **variables}
        compiled = compile_config(SPEC.template, variables=variables)
        spec = export_spec(meta_model(compiled.ir, compiled.ctx), fields)
        assert spec["remote_code"] is remote


# ---- packages: fine-tuning, export, trainers (slow) --------------------------------------------

VOCAB = 300  # > 257: the byte-tokenized corpus fits
IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def _save_tiny(out: Path, shard: str | None = None, **overrides) -> Path:
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=256, **overrides)
    _hf_model(GPT2LMHeadModel, config).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


def _finetune(tmp_path: Path, model_dir: Path, name: str, *extra) -> Path:
    shards = tmp_path / "shards"
    if not shards.exists():
        run_fgc("data", EXAMPLE.parent / "corpus.txt", "-o", shards, check=True)
    out = tmp_path / name
    run_fgc(
        "build", FINETUNE, "-o", out, "-D", f"model_dir={model_dir}", "-D", f"data_dir={shards}",
        "-D", "seq_len=32", "-D", "batch_size=4", "-D", "log_every=1", "-D", "lr=0", *extra, check=True,
    )
    return out


def _run(package: Path, *args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    proc = subprocess.run(
        [*launcher, str(package / "train.py"), *map(str, args)], capture_output=True, text=True,
        cwd=package.parent, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logits(model_dir: Path, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.slow
def test_gpt2_one_step_at_lr_0_exports_the_original_model(tmp_path):
    """Import a sharded GPT-2 checkpoint (untied, inverse-layer scaling), one step at learning
    rate 0 with the chunked loss, export: transformers' GPT2LMHeadModel gives back the original
    logits exactly, from `final/` and from --export-hf, whose checkpoint holds the fused,
    transposed c_attn again."""
    src = _save_tiny(tmp_path / "hf", "100KB", tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    pkg = _finetune(tmp_path, src, "pkg", "-D", "loss_impl=chunked")
    assert "TENSOR_RULES" in (pkg / "model.py").read_text()
    _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    _run(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    original, expected = _logits(src)
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        model, got = _logits(out)
        assert type(model) is GPT2LMHeadModel and model.config.scale_attn_by_inverse_layer_idx
        assert torch.equal(got, expected)
    weights = st.load_dir(tmp_path / "exp")
    assert weights["transformer.h.1.attn.c_attn.weight"].shape == (64, 192) and "lm_head.weight" in weights
    assert not any("q_proj" in name or "model." in name for name in weights)


@pytest.mark.slow
def test_gpt2_sharded_trainers_load_their_share_train_alike_and_export_the_original(tmp_path):
    """FSDP2 with tensor parallelism (2 ranks splitting the transposed, fused c_attn) and a
    2-stage pipeline (the position table on the first stage) build the model on the meta device
    and read only their share: one step at learning rate 0 gives the one-process loss, and the
    export is the original model."""
    # untied: the pipeline refuses a head tied to an embedding on another stage; no dropout, so
    # that every trainer computes the same loss
    src = _save_tiny(tmp_path / "hf", "100KB", tie_word_embeddings=False, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    _, expected = _logits(src)
    basic = _finetune(tmp_path, src, "basic")
    _run(basic, "--max-steps", 1, "--output-dir", tmp_path / "basic_run")
    reference = _losses(tmp_path / "basic_run")
    for trainer, extra in (("fsdp2", ["-D", "tensor_degree=2"]), ("pipeline", [])):
        pkg = _finetune(tmp_path, src, trainer, "-D", f"trainer_type={trainer}", "-D", "nproc=2", *extra)
        assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        if trainer == "fsdp2":
            plan = json.loads((pkg / "manifest.json").read_text())["plan"]["tensor_parallel"]
            assert set(plan["colwise"]) >= {"q_proj", "k_proj", "v_proj", "up_proj"}
        _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / f"{trainer}_run", nproc=2)
        assert _losses(tmp_path / f"{trainer}_run") == pytest.approx(reference, rel=2e-5)
        model, got = _logits(tmp_path / f"{trainer}_run" / "final")
        assert type(model) is GPT2LMHeadModel and torch.equal(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_gpt2_from_scratch_trains_and_exports_as_gpt2(tmp_path, trainer):
    """The main example with -D family=gpt2 (multi-head: 4 key/value heads, its head tied, its
    dropouts on) trains on 2 ranks (DDP; FSDP2 sharding the model built on the meta device) with
    packed-document masking and activation checkpointing; its final/ is a GPT2LMHeadModel with
    the package's logits."""
    pkg = tmp_path / "pkg"
    run_fgc(
        "build", EXAMPLE, "-o", pkg, "-D", "family=gpt2", "-D", "num_key_value_heads=4", "-D", "max_steps=4",
        "-D", "warmup_steps=1", "-D", "log_every=1", "-D", "eval_every=0", "-D", "batch_size=4",
        "-D", "document_masking=true", "-D", "activation_checkpointing=full", "-D", f"trainer_type={trainer}",
        check=True,
    )
    if trainer == "fsdp2":
        assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
    _run(pkg, "--output-dir", tmp_path / "run", nproc=2)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    ids_BT = torch.randint(0, 257, (2, 23), generator=torch.Generator().manual_seed(3))
    if trainer == "fsdp2":
        model, got = _logits(tmp_path / "run" / "final", ids_BT)
        assert type(model) is GPT2LMHeadModel and model.lm_head.weight is model.transformer.wte.weight
        assert torch.isfinite(got).all()
        return
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import model;"
        "m = model.build_model(); m.load_state_dict(torch.load(sys.argv[2])); m.eval();"
        "torch.save(m(torch.load(sys.argv[3])).detach(), sys.argv[4])"
    )
    torch.save(ids_BT, tmp_path / "ids.pt")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004" / "model.pt"
    subprocess.run([sys.executable, "-c", code, str(pkg), str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                   check=True)
    model, got = _logits(tmp_path / "run" / "final", ids_BT)
    assert type(model) is GPT2LMHeadModel
    torch.testing.assert_close(got, torch.load(tmp_path / "l.pt"), atol=1e-5, rtol=0)
