"""The GPT-NeoX family (fgc/families/gpt_neox, lm/gpt_neox.yaml) against transformers'
GPTNeoXForCausalLM.

Tiny random models made with transformers' GPTNeoXConfig (no downloads), saved with
save_pretrained so that their checkpoints hold GPT-NeoX's names and its fused `query_key_value`,
q, k and v interleaved head by head: the family's tensor rules (one with `groups`) split them on
the way in and join them on the way out. Logits are compared in fp32 at atol 1e-5 for each
feature (the parallel and the sequential residual, partial and full rotary, attention with and
without biases, a tied head, scaled rotary, the activations).

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
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

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

SPEC = FAMILIES["gpt_neox"]
FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
SMALL = dict(
    vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
    max_position_embeddings=64, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
)
CASES = {
    "defaults (parallel, rotary 0.25)": dict(),
    "sequential, no attention bias, rotary 0.5": dict(use_parallel_residual=False, attention_bias=False, rotary_pct=0.5),
    "full rotary, tied, gelu_new": dict(rotary_pct=1.0, tie_word_embeddings=True, hidden_act="gelu_new"),
    "linear rope, relu": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.75},
        hidden_act="relu",
    ),
    "gelu_fast, sequential": dict(hidden_act="gelu_fast", rotary_pct=0.5, use_parallel_residual=False),
    "gelu_accurate": dict(hidden_act="gelu_accurate", rotary_pct=0.5),
    "gelu_python_tanh": dict(hidden_act="gelu_python_tanh", rotary_pct=0.5),
    "swish": dict(hidden_act="swish", rotary_pct=0.5),
}


def _rules(fields: dict) -> list[dict]:
    return [rule.to_data(fields) for rule in SPEC.tensors]


def _pair(tmp_path: Path, **overrides):
    """A random transformers GPT-NeoX saved to TMP_PATH/hf, and fgc's gpt_neox template built
    from its config.json with its weights loaded through the family's tensor rules."""
    config = GPTNeoXConfig(**SMALL, **overrides)
    hf = _hf_model(GPTNeoXForCausalLM, config)
    hf.save_pretrained(tmp_path / "hf")
    fields = _hf_fields(config)
    package = _build(tmp_path, "gpt_neox", {"hf_fields": fields})
    ours = _import_model(package).build_model().eval()
    load_weights(ours, tmp_path / "hf", _rules(fields))
    return hf, ours, package


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_neox_logits_match_transformers(tmp_path, case):
    hf, ours, _ = _pair(tmp_path, **CASES[case])
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in st.load_dir(tmp_path / "hf")
    ids_BT = _ids(97)
    with torch.no_grad():
        ref_BTV, out_BTV = hf(ids_BT).logits, ours(ids_BT)
    assert ref_BTV.abs().max() > 0.1
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    overrides = CASES[case]
    layer, attn = ours.model.layers[0], ours.model.layers[0].self_attn
    assert layer.use_parallel_residual == overrides.get("use_parallel_residual", True)
    assert (attn.q_proj.bias is not None) == overrides.get("attention_bias", True)
    rotary = {"defaults (parallel, rotary 0.25)": 4, "full rotary, tied, gelu_new": None, "linear rope, relu": 12}
    assert attn.rotary_dim == rotary.get(case, 8)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == overrides.get("tie_word_embeddings", False)
    if case == "linear rope, relu":
        assert type(ours.model.positions).__name__ == "LinearScalingRotaryEmbedding"
        assert ours.model.positions.rope_theta == 500.0


def test_gpt_neox_features_matter(tmp_path):
    """The residual's form and the rotary fraction each change the logits, so the comparisons
    above are not vacuous."""
    hf, ours, _ = _pair(tmp_path, rotary_pct=0.5)
    ids_BT = _ids(97)
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        for layer in ours.model.layers:
            layer.use_parallel_residual = False
        assert (ours(ids_BT) - ref_BTV).abs().max() > 1e-3
        for layer in ours.model.layers:
            layer.use_parallel_residual = True
        torch.testing.assert_close(ours(ids_BT), ref_BTV, atol=1e-5, rtol=0)
        other = GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, rotary_pct=0.25)).eval()
        other.load_state_dict(hf.state_dict())
        assert (other(ids_BT).logits - ref_BTV).abs().max() > 1e-3


def test_gpt_neox_older_config_json_fields_give_transformers_rotary(tmp_path):
    """A config.json of an earlier transformers (rotary_pct, rotary_emb_base, no rope_parameters,
    as Pythia's) builds the rotary transformers 5 derives from it."""
    fields = {k: v for k, v in _hf_fields(GPTNeoXConfig(**SMALL)).items() if k != "rope_parameters"}
    fields.update(rotary_pct=0.5, rotary_emb_base=500)
    theirs = GPTNeoXConfig(**fields).rope_parameters
    assert theirs["partial_rotary_factor"] == 0.5 and theirs["rope_theta"] == 500
    assert SPEC.classify(fields) == (None, [])
    package = _build(tmp_path, "gpt_neox", {"hf_fields": fields})
    model = _import_model(package).build_model()
    assert model.model.layers[0].self_attn.rotary_dim == 8
    assert model.model.positions.head_dim == 8 and model.model.positions.rope_theta == 500


def test_gpt_neox_fused_tensors_split_and_join_exactly(tmp_path):
    """fgc's state dict joined by the family's rules is the transformers checkpoint, tensor for
    tensor: query_key_value holds head h's q, k and v rows one after another."""
    hf, ours, _ = _pair(tmp_path)
    fields = _hf_fields(hf.config)
    ours_hf = TensorMap(_rules(fields)).to_hf(ours.state_dict())
    theirs = {("embed_out.weight" if name == "lm_head.weight" else name): v for name, v in hf.state_dict().items()}
    assert sorted(ours_hf) == sorted(theirs) == sorted(st.load_dir(tmp_path / "hf"))
    for name, value in theirs.items():
        assert torch.equal(ours_hf[name], value), name
    attn = ours.model.layers[1].self_attn
    qkv = theirs["gpt_neox.layers.1.attention.query_key_value.weight"]  # (heads * 3 * 16, 64)
    for h in range(4):
        assert torch.equal(attn.q_proj.weight[16 * h : 16 * h + 16], qkv[48 * h : 48 * h + 16])
        assert torch.equal(attn.k_proj.weight[16 * h : 16 * h + 16], qkv[48 * h + 16 : 48 * h + 32])
        assert torch.equal(attn.v_proj.weight[16 * h : 16 * h + 16], qkv[48 * h + 32 : 48 * h + 48])
    # a checkpoint with the head under transformers 5's in-memory name, and the old mask buffers
    saved = st.load_dir(tmp_path / "hf")
    saved["lm_head.weight"] = saved.pop("embed_out.weight")
    saved["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    saved["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    (tmp_path / "renamed").mkdir()
    st.save_file(saved, tmp_path / "renamed" / "model.safetensors")
    fresh = _import_model(tmp_path / "pkg").build_model().eval()
    load_weights(fresh, tmp_path / "renamed", _rules(fields))
    for name, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_gpt_neox_packed_documents_attend_within_each_document(tmp_path):
    """document_ids: positions restart at each document, as the library does for every rotary
    family (transformers' position_ids for packed documents), and each document's logits are
    transformers' for that document alone."""
    hf, ours, _ = _pair(tmp_path, rotary_pct=0.5)
    ids_BT = _ids(97, batch=1, seq=20)
    docs_BT = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed_BTV = ours(ids_BT, docs_BT)
        torch.testing.assert_close(packed_BTV[:, :8], hf(ids_BT[:, :8]).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_BTV[:, 8:], hf(ids_BT[:, 8:]).logits, atol=1e-5, rtol=0)
        positions_BT = torch.tensor([list(range(8)) + list(range(12))])
        mask_B1TS = torch.zeros(1, 1, 20, 20).masked_fill(
            ~(torch.ones(20, 20, dtype=torch.bool).tril() & (docs_BT[0, :, None] == docs_BT[0, None, :])), float("-inf")
        )
        ref_BTV = hf(ids_BT, position_ids=positions_BT, attention_mask=mask_B1TS).logits
        torch.testing.assert_close(packed_BTV, ref_BTV, atol=1e-5, rtol=0)
        assert (packed_BTV[:, 8:] - ours(ids_BT)[:, 8:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def scratch_package(tmp_path_factory):
    """The gpt_neox template from scratch with its dropouts on: 3 layers of width 32, 4 heads."""
    return _build(
        tmp_path_factory.mktemp("neox"), "gpt_neox",
        {"hidden_size": 32, "num_hidden_layers": 3, "hidden_dropout": 0.1, "attention_dropout": 0.1},
    )


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gpt_neox_activation_checkpointing_keeps_the_gradients(scratch_package, mode):
    build_model = _import_model(scratch_package).build_model
    ids_BT = _ids(257, batch=2, seq=9)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model()
        if checkpointed:
            assert apply_activation_checkpointing(model, mode=mode) == 3
        torch.manual_seed(7)
        model(ids_BT).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_gpt_neox_meta_device_build_gets_the_whole_models_values(scratch_package):
    build_model = _import_model(scratch_package).build_model
    torch.manual_seed(5)
    whole = build_model()
    torch.manual_seed(5)
    meta = build_model(device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights()
    for name, value in whole.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert meta.model.positions.head_dim == 2  # 0.25 of head_dim 8
    ids_BT = _ids(257, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(ids_BT), whole.eval()(ids_BT), atol=0, rtol=0)


def test_gpt_neox_explain_counts_the_parameters_and_flops(tmp_path):
    args = ("-D", "family=gpt_neox", "-D", "num_key_value_heads=4")
    proc = run_fgc("explain", EXAMPLE, *args)
    assert proc.returncode == 0, proc.stderr
    run_fgc("build", EXAMPLE, "-o", tmp_path / "pkg", *args, check=True)
    model = _import_model(tmp_path / "pkg").build_model()
    total = sum(p.numel() for p in model.parameters())
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["total", f"{total:,}"] for line in lines)
    flops, formula = model.flops_per_token(128)
    # the untied head is a matmul; the token embedding a lookup
    assert f"6*{total - 257 * 96:,} + 12*3*96*128" in formula and f"{flops:,.0f}" in proc.stdout


def test_gpt_neox_chunked_loss_is_accepted(tmp_path):
    package = _build(tmp_path, "gpt_neox", {"loss_impl": "chunked"})
    model = _import_model(package).build_model()
    weight, bias = model.output_projection()
    assert weight is model.lm_head.weight and bias is None


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_from_scratch_exports_as_its_family(tmp_path, parallel):
    """Built from scratch (multi-head attention), the package's hf_config.json names
    GPTNeoXForCausalLM, and transformers' model of that config with fgc's weights (through the
    tensor rules) computes fgc's logits. The main example builds GPT-NeoX's multi-head attention
    by default; with 2 key/value heads (grouped-query attention, which GPT-NeoX lacks) the export
    is fgc's own class."""
    package = _build(
        tmp_path, "gpt_neox",
        {"hidden_size": 32, "num_hidden_layers": 2, "use_parallel_residual": parallel, "rotary_pct": 0.5},
    )
    spec = json.loads((package / "hf_config.json").read_text())
    assert spec["remote_code"] is False and spec["config"]["architectures"] == ["GPTNeoXForCausalLM"]
    assert spec["config"]["use_parallel_residual"] is parallel
    ours = _import_model(package).build_model().eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    config = AutoConfig.for_model(**spec["config"])
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config).eval()
    assert type(hf) is GPTNeoXForCausalLM
    state = TensorMap(_rules(spec["config"])).to_hf(ours.state_dict())
    state["lm_head.weight"] = state.pop("embed_out.weight")
    hf.load_state_dict(state, strict=True)
    ids_BT = _ids(257, seq=11)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids_BT).logits, ours(ids_BT), atol=1e-5, rtol=0)
    # the main example defaults its key/value heads to the heads for a family without
    # grouped-query attention; 2 of them, asked for, build as asked: fgc's own class
    for flags, architecture in (([], "GPTNeoXForCausalLM"), (["-D", "num_key_value_heads=2"], "FgcForCausalLM")):
        out = tmp_path / f"example{len(flags)}"
        run_fgc("build", EXAMPLE, "-o", out, "-D", "family=gpt_neox", *flags, check=True)
        spec = json.loads((out / "hf_config.json").read_text())
        assert spec["remote_code"] is (architecture == "FgcForCausalLM")
        assert spec["config"]["architectures"] == [architecture]


def _fields(**overrides) -> dict:
    return {**_hf_fields(GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "attn_implementation"})), **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "quick_gelu"}, "hidden_act is 'quick_gelu', which fgc's MLP does not have"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
         "rope_parameters has rope_type 'longrope', which fgc's rotary embeddings do not have"),
        ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling has rope_type 'su'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
         "partial_rotary_factor 0.1 rotates 1 of each head's 16 channels"),
        ({"rope_parameters": None, "rotary_pct": 0.0}, "rotary_pct must be in (0, 1], got 0.0"),
        ({"num_attention_heads": 5}, "num_attention_heads (5) must divide hidden_size (64)"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
        ({"hidden_dropout": 1.0}, "hidden_dropout must be a probability below 1, got 1.0"),
    ],
)
def test_gpt_neox_config_fields_it_cannot_represent_are_errors(overrides, message):
    problem, _ = SPEC.classify(_fields(**overrides))
    assert problem is not None and message in problem, problem


def test_gpt_neox_metadata_fields_are_notes():
    fields = _fields(unsloth_version="2024.9", classifier_dropout=0.3)
    assert SPEC.classify(fields) == (None, ["unsloth_version"])


def test_gpt_neox_a_pythia_config_json_is_accepted(tmp_path):
    """EleutherAI/pythia-70m's config.json (transformers 4.24: rotary_pct and rotary_emb_base)
    is accepted whole and builds a quarter of each head rotating."""
    pythia = {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
    }
    assert SPEC.classify(pythia) == (None, [])
    compiled = compile_config(SPEC.template, variables={"data_dir": "data", "hf_fields": pythia})
    from fgc_lowering.construct import meta_model

    model = meta_model(compiled.ir, compiled.ctx)
    assert model.model.layers[0].self_attn.rotary_dim == 16 and model.model.positions.max_position_embeddings == 2048
    assert export_spec(model, pythia)["config"]["architectures"] == ["GPTNeoXForCausalLM"]


def test_gpt_neox_config_errors_at_the_hf_config_line(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_fields(hidden_act="quick_gelu")))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"examples/hf_finetune/finetune.yaml:{line_of(FINETUNE, 'hf_config(')}: error:")
    assert "hidden_act is 'quick_gelu', which fgc's MLP does not have" in first
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"hidden_act": "quick_gelu"}, "hidden_act quick_gelu is not supported"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "rope_scaling: rope_type longrope is not supported"),
    ],
)
def test_gpt_neox_knob_errors_name_the_template_line(variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(SPEC.template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.file.endswith("template.yaml") and d.loc.line is not None


def test_gpt_neox_a_model_changed_from_its_config_json_is_not_exported_as_it():
    from fgc_lowering.construct import meta_model

    fields = _fields()
    for variables, remote in (({}, False), ({"layer_norm_eps": 1e-3}, True), ({"use_parallel_residual": False}, True)):
        compiled = compile_config(SPEC.template, variables={"data_dir": "data", "hf_fields": fields, **variables})
        spec = export_spec(meta_model(compiled.ir, compiled.ctx), fields)
        assert spec["remote_code"] is remote, variables


# ---- packages: fine-tuning, export, trainers (slow) --------------------------------------------

VOCAB = 300  # > 257: the byte-tokenized corpus fits
IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def _save_tiny(out: Path, shard: str | None = None, **overrides) -> Path:
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, bos_token_id=1, eos_token_id=256, **overrides)
    _hf_model(GPTNeoXForCausalLM, config).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
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
def test_gpt_neox_one_step_at_lr_0_exports_the_original_model(tmp_path):
    """Import a sharded GPT-NeoX checkpoint (sequential residual, no attention bias, half the
    channels rotating), one step at learning rate 0 with the chunked loss, export:
    transformers' GPTNeoXForCausalLM gives back the original logits exactly, from `final/` and
    from --export-hf, whose checkpoint holds the interleaved query_key_value again."""
    src = _save_tiny(tmp_path / "hf", "100KB", use_parallel_residual=False, attention_bias=False, rotary_pct=0.5)
    pkg = _finetune(tmp_path, src, "pkg", "-D", "loss_impl=chunked")
    assert "TENSOR_RULES" in (pkg / "model.py").read_text()
    _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    _run(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    original, expected = _logits(src)
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        model, got = _logits(out)
        assert type(model) is GPTNeoXForCausalLM
        assert torch.equal(got, expected)
        assert model.config.use_parallel_residual is False and model.config.attention_bias is False
        assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    weights = st.load_dir(tmp_path / "exp")
    assert sorted(weights) == sorted(st.load_dir(src))


@pytest.mark.slow
def test_gpt_neox_sharded_trainers_load_their_share_train_alike_and_export_the_original(tmp_path):
    """FSDP2 with tensor parallelism (2 ranks, each reading its heads' share of the interleaved
    query_key_value), FSDP2 sharding over 2 data-parallel ranks, and a 2-stage pipeline build
    the model on the meta device: one step at
    learning rate 0 gives the one-process loss, and the export is the original model."""
    src = _save_tiny(tmp_path / "hf", "100KB", rotary_pct=0.5)
    _, expected = _logits(src)
    basic = _finetune(tmp_path, src, "basic")
    _run(basic, "--max-steps", 1, "--output-dir", tmp_path / "basic_run")
    reference = _losses(tmp_path / "basic_run")
    for trainer, extra in (("fsdp2", ["-D", "tensor_degree=2"]), ("fsdp2", []), ("pipeline", [])):
        name = trainer + ("_tp" if extra else "")
        pkg = _finetune(tmp_path, src, name, "-D", f"trainer_type={trainer}", "-D", "nproc=2", *extra)
        assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        if extra:
            plan = json.loads((pkg / "manifest.json").read_text())["plan"]["tensor_parallel"]
            assert set(plan["colwise"]) >= {"q_proj", "k_proj", "v_proj", "up_proj"}
        _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / f"{name}_run", nproc=2)
        assert _losses(tmp_path / f"{name}_run") == pytest.approx(reference, rel=2e-5)
        model, got = _logits(tmp_path / f"{name}_run" / "final")
        assert type(model) is GPTNeoXForCausalLM and torch.equal(got, expected)


@pytest.mark.slow
def test_gpt_neox_from_scratch_trains_with_ddp_and_exports_as_gpt_neox(tmp_path):
    """The main example with -D family=gpt_neox (multi-head: 4 key/value heads) trains on 2 DDP
    ranks with packed-document masking and activation checkpointing; its final/ is a
    GPTNeoXForCausalLM with the package's logits."""
    pkg = tmp_path / "pkg"
    run_fgc(
        "build", EXAMPLE, "-o", pkg, "-D", "family=gpt_neox", "-D", "num_key_value_heads=4", "-D", "max_steps=4",
        "-D", "warmup_steps=1", "-D", "log_every=1", "-D", "eval_every=0", "-D", "batch_size=4",
        "-D", "document_masking=true", "-D", "activation_checkpointing=full", check=True,
    )
    _run(pkg, "--output-dir", tmp_path / "run", nproc=2)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    ids_BT = torch.randint(0, 257, (2, 23), generator=torch.Generator().manual_seed(3))
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
    assert type(model) is GPTNeoXForCausalLM
    torch.testing.assert_close(got, torch.load(tmp_path / "l.pt"), atol=1e-5, rtol=0)
