"""The Phi-3 family (fgc/families/phi3, lm/phi3.yaml) against transformers' Phi3ForCausalLM.

Tiny random models made with transformers' Phi3Config (no downloads), saved with save_pretrained
so that their checkpoints hold Phi-3's fused `qkv_proj` and `gate_up_proj`: the family's tensor
rules split them on the way in and join them on the way out. Logits are compared in fp32 at atol
1e-5 for each feature (GQA, partial rotary, a sliding window shorter than the input, a tied head,
LongRoPE with its short and long factors).

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from conftest import EXAMPLE, REPO, run_fgc
from family_checks import logged_losses as _losses
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES
from fgc_runtime import safetensors as st
from fgc_runtime.hf import TensorMap, load_weights
from test_families import SEQ, SMALL, _build, _hf_fields, _hf_model, _ids, _import_model

SPEC = FAMILIES["phi3"]
RULES = [rule.to_data() for rule in SPEC.tensors]
FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
# Phi3Config's pad_token_id (32000) would be outside the tiny vocabularies
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(6)],
    "long_factor": [2.0 + 0.5 * i for i in range(6)],
}
CASES = {
    "gqa": dict(),
    "partial rotary, window, tied": dict(partial_rotary_factor=0.5, sliding_window=5, tie_word_embeddings=True),
    # 12 of 16 channels rotate; the long factors apply beyond 16 positions; factor 64/16 scales cos and sin
    "longrope": dict(
        partial_rotary_factor=0.75, max_position_embeddings=64, original_max_position_embeddings=16, rope_scaling=LONGROPE
    ),
}


def _pair(tmp_path: Path, **overrides):
    """A random transformers Phi-3 saved to TMP_PATH/hf, and fgc's phi3 template built from its
    config.json with its weights loaded through the family's tensor rules."""
    config = Phi3Config(**SMALL, **TOKENS, **overrides)
    hf = _hf_model(Phi3ForCausalLM, config)
    hf.save_pretrained(tmp_path / "hf")
    package = _build(tmp_path, "phi3", {"hf_fields": _hf_fields(config)})
    ours = _import_model(package).build_model().eval()
    load_weights(ours, tmp_path / "hf", RULES)
    return hf, ours, package


@pytest.mark.parametrize("case", list(CASES))
def test_phi3_logits_match_transformers(tmp_path, case):
    hf, ours, _ = _pair(tmp_path, **CASES[case])
    assert "model.layers.0.self_attn.qkv_proj.weight" in st.load_dir(tmp_path / "hf")
    # a long input and one within original_max_position_embeddings (LongRoPE's short factors)
    for seq in (SEQ, 9):
        ids_BT = _ids(97, seq=seq)
        with torch.no_grad():
            ref_BTV, out_BTV = hf(ids_BT).logits, ours(ids_BT)
        assert ref_BTV.abs().max() > 0.1
        torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    attn, positions = ours.model.layers[0].self_attn, ours.model.positions
    if case == "partial rotary, window, tied":
        assert attn.rotary_dim == 8 and positions.head_dim == 8 and attn.sliding_window == 5
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    if case == "longrope":
        assert type(positions).__name__ == "Phi3LongRoPEEmbedding" and positions.head_dim == 12
        assert positions.attention_factor == pytest.approx((1 + torch.tensor(4.0).log() / torch.tensor(16.0).log()) ** 0.5)
        # the long factors apply to the 37-token input, the short ones to the 9-token one
        long_cos, _ = positions.tables(torch.arange(SEQ)[None])
        short_cos, _ = positions.tables(torch.arange(9)[None])
        assert (long_cos[:, :9] - short_cos).abs().max() > 1e-2


def test_phi3_features_matter(tmp_path):
    """The window, and the partial rotary with LongRoPE, each change the logits, so the
    comparisons above are not vacuous."""
    hf, ours, _ = _pair(tmp_path, **CASES["longrope"], sliding_window=5)
    ids_BT = _ids(97)
    # the same weights (the same shapes) with full default rotary and no window
    plain = _hf_model(Phi3ForCausalLM, Phi3Config(**SMALL, **TOKENS, max_position_embeddings=64, sliding_window=5))
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        torch.testing.assert_close(ours(ids_BT), ref_BTV, atol=1e-5, rtol=0)
        assert (plain(ids_BT).logits - ref_BTV).abs().max() > 1e-3
        for layer in ours.model.layers:
            layer.self_attn.sliding_window = None
        windowless_BTV = ours(ids_BT)
    torch.testing.assert_close(windowless_BTV[:, :5], ref_BTV[:, :5], atol=1e-5, rtol=0)
    assert (windowless_BTV[:, 5:] - ref_BTV[:, 5:]).abs().max() > 1e-3


def test_phi3_fused_tensors_split_and_join_exactly(tmp_path):
    """fgc's state dict joined by the family's rules is the transformers checkpoint, tensor for
    tensor: q, k, v rows in that order, then gate and up."""
    hf, ours, _ = _pair(tmp_path, **CASES["gqa"])
    ours_hf = TensorMap(RULES).to_hf(ours.state_dict())
    theirs = hf.state_dict()
    assert sorted(ours_hf) == sorted(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours_hf[name], value), name
    attn = ours.model.layers[1].self_attn
    qkv = theirs["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(attn.k_proj.weight, qkv[64:96]) and torch.equal(attn.v_proj.weight, qkv[96:])
    assert torch.equal(ours.model.layers[1].mlp.up_proj.weight, theirs["model.layers.1.mlp.gate_up_proj.weight"][112:])


def test_phi3_packed_documents_attend_within_each_document(tmp_path):
    """document_ids: each document's logits are those of the document alone (the window and
    partial rotary included)."""
    _, ours, _ = _pair(tmp_path, **CASES["partial rotary, window, tied"])
    ids_BT = _ids(97, batch=1, seq=20)
    docs_BT = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed_BTV = ours(ids_BT, docs_BT)
        torch.testing.assert_close(packed_BTV[:, :8], ours(ids_BT[:, :8]), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_BTV[:, 8:], ours(ids_BT[:, 8:]), atol=1e-5, rtol=0)


def _fields(**overrides) -> dict:
    return {**_hf_fields(Phi3Config(**{k: v for k, v in SMALL.items() if k != "attn_implementation"}, **TOKENS)), **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"resid_pdrop": 0.1}, "resid_pdrop is 0.1, but fgc's phi3 template supports only 0.0"),
        ({"embd_pdrop": 0.1}, "embd_pdrop is 0.1, but fgc's phi3 template supports only 0.0"),
        ({"attention_dropout": 0.1}, "attention_dropout is 0.1, but fgc's phi3 template supports only 0.0"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's phi3 template supports only 'silu'"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
            "rope_parameters has rope_type 'linear', which fgc's phi3 template does not have (it has: default, longrope)",
        ),
        (
            {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
            "rope_scaling has rope_type 'su'",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
            "partial_rotary_factor 0.1 rotates 1 of the 16 channels of a head",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}},
            "rope_parameters: longrope's short_factor must be a list of 8 numbers",
        ),
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ],
)
def test_phi3_config_fields_it_cannot_represent_are_errors(overrides, message):
    problem, _ = SPEC.classify(_fields(**overrides))
    assert problem is not None and message in problem


def test_phi3_metadata_and_fields_transformers_does_not_read_are_notes(tmp_path):
    """attention_bias and mlp_bias are not Phi3Config's: transformers builds no bias, and
    neither does the template; they are ignored with a note like any metadata."""
    fields = _fields(attention_bias=True, mlp_bias=True, unsloth_version="2024.9")
    problem, ignored = SPEC.classify(fields)
    assert problem is None and ignored == ["attention_bias", "mlp_bias", "unsloth_version"]
    package = _build(tmp_path, "phi3", {"hf_fields": fields})
    model = _import_model(package).build_model()
    assert all(p.bias is None for p in model.modules() if isinstance(p, torch.nn.Linear))


def test_phi3_config_errors_at_the_hf_config_line(tmp_path):
    config = Phi3Config(**{k: v for k, v in SMALL.items() if k != "attn_implementation"}, **TOKENS)
    config.save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={tmp_path / 'hf'}")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("examples/hf_finetune/finetune.yaml:12: error:")
    assert "rope_parameters has rope_type 'yarn', which fgc's phi3 template does not have" in first
    assert "Traceback" not in proc.stderr and not (tmp_path / "pkg").exists()


def test_phi3_template_knob_errors_name_the_template_line():
    with pytest.raises(FgcError) as info:
        compile_config(SPEC.template, variables={"data_dir": "data", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    [d] = info.value.diagnostics
    assert "rope_type yarn is not supported by the phi3 template (supported: default, longrope)" in d.message
    assert d.loc.file.endswith("template.yaml") and d.loc.line is not None


# ---- packages: fine-tuning, export, trainers ----------------------------------------------------

VOCAB = 300  # > 257: the byte-tokenized corpus fits
IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def _save_tiny(out: Path, shard: str | None = None, **overrides) -> Path:
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=256, **overrides,
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
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
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, shard",
    [
        (dict(), "100KB"),
        (dict(partial_rotary_factor=0.5, sliding_window=7, tie_word_embeddings=True, max_position_embeddings=64,
              original_max_position_embeddings=16, rope_scaling={"type": "longrope", "short_factor": [1.1] * 4,
                                                                  "long_factor": [3.0, 2.0, 1.5, 1.0]}), None),
    ],
)
def test_phi3_one_step_at_lr_0_exports_the_original_model(tmp_path, overrides, shard):
    """Import the fused checkpoint (sharded or not), one step at learning rate 0 with the chunked
    loss, export: transformers' Phi3ForCausalLM gives back the original logits exactly, from
    `final/` and from --export-hf, whose checkpoint holds the fused tensors again."""
    src = _save_tiny(tmp_path / "hf", shard, **overrides)
    pkg = _finetune(tmp_path, src, "pkg", "-D", "loss_impl=chunked")
    assert "TENSOR_RULES" in (pkg / "model.py").read_text()
    _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    _run(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    original, expected = _logits(src)
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        model, got = _logits(out)
        assert type(model) is Phi3ForCausalLM
        assert torch.equal(got, expected)
        assert model.config.to_dict()["rope_parameters"] == original.config.to_dict()["rope_parameters"]
        assert model.config.sliding_window == original.config.sliding_window
    weights = st.load_dir(tmp_path / "exp")
    assert "model.layers.1.self_attn.qkv_proj.weight" in weights and "model.layers.1.mlp.gate_up_proj.weight" in weights
    assert not any("q_proj" in name or "gate_proj." in name for name in weights)
    assert ("lm_head.weight" in weights) == (not overrides.get("tie_word_embeddings", False))


@pytest.mark.slow
def test_phi3_sharded_trainers_load_their_share_train_alike_and_export_the_original(tmp_path):
    """FSDP2 with tensor parallelism (2 ranks splitting q, k, v, gate and up) and a 2-stage
    pipeline build the model on the meta device and read only their share of the fused
    tensors: one step at learning rate 0 gives the one-process loss, and the export is the
    original model."""
    src = _save_tiny(tmp_path / "hf", "100KB", partial_rotary_factor=0.75, sliding_window=9,
                     max_position_embeddings=64, original_max_position_embeddings=16,
                     rope_scaling={"type": "longrope", "short_factor": [1.1] * 6, "long_factor": [2.0] * 6})
    _, expected = _logits(src)
    basic = _finetune(tmp_path, src, "basic")
    _run(basic, "--max-steps", 1, "--output-dir", tmp_path / "basic_run")
    reference = _losses(tmp_path / "basic_run")
    for trainer, extra in (("fsdp2", ["-D", "tensor_degree=2"]), ("pipeline", [])):
        pkg = _finetune(tmp_path, src, trainer, "-D", f"trainer_type={trainer}", "-D", "nproc=2", *extra)
        assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        if trainer == "fsdp2":
            plan = json.loads((pkg / "manifest.json").read_text())["plan"]["tensor_parallel"]
            assert plan["colwise"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
        _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / f"{trainer}_run", nproc=2)
        assert _losses(tmp_path / f"{trainer}_run") == pytest.approx(reference, rel=2e-5)
        model, got = _logits(tmp_path / f"{trainer}_run" / "final")
        assert type(model) is Phi3ForCausalLM and torch.equal(got, expected)


@pytest.mark.slow
def test_phi3_from_scratch_trains_with_ddp_and_exports_as_phi3(tmp_path):
    """The main example with -D family=phi3 (and partial rotary, which only Phi-3 of the families
    has) trains on 2 DDP ranks with packed-document masking and activation checkpointing; its
    final/ is a Phi3ForCausalLM with the package's logits."""
    pkg = tmp_path / "pkg"
    run_fgc(
        "build", EXAMPLE, "-o", pkg, "-D", "family=phi3", "-D", "partial_rotary_factor=0.5", "-D", "max_steps=4", "-D", "warmup_steps=1",
        "-D", "log_every=1", "-D", "eval_every=0", "-D", "document_masking=true", "-D", "activation_checkpointing=full",
        check=True,
    )
    assert json.loads((pkg / "hf_config.json").read_text())["config"]["architectures"] == ["Phi3ForCausalLM"]
    _run(pkg, "--output-dir", tmp_path / "run", nproc=2)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
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
    assert type(model) is Phi3ForCausalLM
    assert torch.equal(got, torch.load(tmp_path / "l.pt"))
