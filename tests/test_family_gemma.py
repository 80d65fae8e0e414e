"""The Gemma families (lm/gemma.yaml, lm/gemma2.yaml, lm/gemma3.yaml) against transformers.

Each logits test makes a tiny random model with transformers' config class (no downloads), builds
the family template with the config's fields as `hf_fields`, imports the generated `model.py`,
loads transformers' state dict into `build_model()` and compares the logits in fp32 at atol 1e-5
(transformers' eager attention: an independent reference for SDPA and for the soft-capped path).
Each feature is also shown to matter: turned off in fgc's model, the logits differ.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
)

from conftest import EXAMPLE, REPO, run_fgc
from family_checks import build as _build, hf_fields as _hf_fields, ids as _ids, import_model as _import_model, train as _train
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES
from fgc.hf import export_spec
from fgc_runtime.parallel import apply_activation_checkpointing

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # not hidden_size / heads, as in Gemma's configs
    intermediate_size=112,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    attn_implementation="eager",
)
SEQ = 37
FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"


def _hf_model(model_class, config):
    """A transformers model with every weight random (norm weights too, so `1 + weight` is far
    from 1), in eval mode."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _logits_pair(tmp_path, family, model_class, config, fields=None):
    """(transformers' logits, fgc's, fgc's model, the package) for CONFIG, fgc's model built from
    FIELDS (default: the config's own) with transformers' weights."""
    hf = _hf_model(model_class, config)
    package = _build(tmp_path, family, {"hf_fields": fields if fields is not None else _hf_fields(config)})
    ours = _import_model(package).build_model().eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids_BT = _ids(config.vocab_size)
    with torch.no_grad():
        ref_BTV, out_BTV = hf(ids_BT).logits, ours(ids_BT)
    assert ref_BTV.abs().max() > 0.1  # not a vacuous comparison of near-zero logits
    return ref_BTV, out_BTV, ours, package


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(model.vocab_size))


# ---- logits against transformers ------------------------------------------------------------


@pytest.mark.parametrize(
    "case, options",
    [
        ("tied", dict(num_hidden_layers=2)),
        ("untied, biases, linear rope", dict(
            num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        )),
        ("legacy gelu", dict(num_hidden_layers=1, hidden_act="gelu")),
        ("gelu_new", dict(num_hidden_layers=1, hidden_act="gelu_new")),
    ],
)
def test_gemma_logits_match_transformers(tmp_path, case, options):
    config = GemmaConfig(**SMALL, **options)
    ref_BTV, out_BTV, ours, _ = _logits_pair(tmp_path, "gemma", GemmaForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layer = ours.model.layers[0]
    assert type(layer).__name__ == "PreNormDecoderLayer" and type(layer.mlp).__name__ == "GatedMLP"
    assert layer.mlp.activation == "gelu_tanh"  # transformers' Gemma reads "gelu" as the tanh GELU
    assert layer.self_attn.head_dim == 24 and layer.input_layernorm.offset == 1.0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config.tie_word_embeddings
    assert (layer.self_attn.o_proj.bias is not None) == config.attention_bias
    if case == "tied":
        # the features matter: without the sqrt(hidden_size) embedding scale, or with plain
        # RMSNorm scales, the logits differ
        ours.model.embedding_multiplier = None
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
        ours.model.embedding_multiplier = 64**0.5
        for norm in (m for m in ours.modules() if type(m).__name__ == "RMSNorm"):
            norm.offset = 0.0
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3


GEMMA2_CASES = {
    # small caps, so that capping changes the numbers; a window of 5 < SEQ
    "soft-capped": dict(
        num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=20, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0,
    ),
    # no capping (the SDPA path), exact GELU, layer types given
    "uncapped": dict(
        num_hidden_layers=4, sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=None,
        final_logit_softcapping=None, hidden_activation="gelu",
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("case", list(GEMMA2_CASES))
def test_gemma2_logits_match_transformers(tmp_path, case):
    config = Gemma2Config(**SMALL, **GEMMA2_CASES[case])
    ref_BTV, out_BTV, ours, _ = _logits_pair(tmp_path, "gemma2", Gemma2ForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layers = list(ours.decoder_layers())
    assert {type(layer).__name__ for layer in layers} == {"GemmaSandwichDecoderLayer"}
    windows = [layer.self_attn.sliding_window for layer in layers]
    assert windows == [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    assert layers[0].self_attn.scaling == config.query_pre_attn_scalar**-0.5
    assert layers[0].mlp.activation == ("gelu" if case == "uncapped" else "gelu_tanh")
    if case == "soft-capped":
        assert windows == [5, None, 5, None]  # transformers' default: alternating, sliding first
        assert ours.output_projection() is None  # the chunked loss cannot compute a capped head
        # each feature matters: the final cap, the score cap, the window, the scale
        ours.final_logit_softcapping = None
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
        ours.final_logit_softcapping = 2.0
        for layer in layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
        for layer in layers:
            layer.self_attn.attn_logit_softcapping = 0.5
            layer.self_attn.sliding_window = None
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
        for layer, window in zip(layers, windows):
            layer.self_attn.sliding_window = window
            layer.self_attn.scaling = None
        assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
    else:
        assert ours.output_projection() is not None


GEMMA3_CASES = {
    # transformers 5's per-layer-type rope_parameters, Gemma 3's linear scaling of the global
    # tables, layer types from sliding_window_pattern, capped logits
    "linear global rope": dict(
        num_hidden_layers=4, sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=20,
        final_logit_softcapping=3.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
        },
    ),
    "yarn global rope": dict(
        num_hidden_layers=3, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0,
                               "original_max_position_embeddings": 16},
        },
    ),
}


@pytest.mark.parametrize("case", list(GEMMA3_CASES))
def test_gemma3_logits_match_transformers(tmp_path, case):
    config = Gemma3TextConfig(**SMALL, **GEMMA3_CASES[case])
    ref_BTV, out_BTV, ours, package = _logits_pair(tmp_path, "gemma3", Gemma3ForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layers = list(ours.decoder_layers())
    assert [layer.self_attn.layer_type for layer in layers] == config.layer_types
    assert all(layer.self_attn.q_norm.offset == 1.0 for layer in layers)
    positions = ours.model.positions
    assert type(positions).__name__ == "GemmaLocalGlobalRotary"
    assert (positions.local_rotary.rope_theta, positions.global_rotary.rope_theta) == (10.0, 1000.0)
    expected = {"linear global rope": "LinearScalingRotaryEmbedding", "yarn global rope": "YarnRotaryEmbedding"}[case]
    assert type(positions.global_rotary).__name__ == expected
    assert type(positions.local_rotary).__name__ == "RotaryEmbedding"
    text = (package / "model.py").read_text()
    assert "# ---- vendored from fgc/families/gemma/parts.py" in text and "fgc.families" not in text.split("# ----")[0]
    # each feature matters: one table for every layer (the local one), no QK-norm
    local, global_ = positions.local_rotary, positions.global_rotary
    positions.global_rotary = local
    assert (_logits(ours) - ref_BTV).abs().max() > 1e-3
    positions.global_rotary = global_
    for layer in layers:
        layer.self_attn.q_norm.offset = layer.self_attn.k_norm.offset = 0.0
    assert (_logits(ours) - ref_BTV).abs().max() > 1e-3


def test_gemma3_config_json_of_an_earlier_transformers_matches(tmp_path):
    """A config.json written before transformers 5: rope_theta, rope_scaling (global layers),
    rope_local_base_freq and sliding_window_pattern instead of rope_parameters and layer_types."""
    legacy = {
        **{k: v for k, v in SMALL.items() if k != "attn_implementation"},
        "model_type": "gemma3_text", "num_hidden_layers": 3, "sliding_window": 4, "sliding_window_pattern": 3,
        "rope_theta": 900.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_local_base_freq": 20.0,
        "query_pre_attn_scalar": 24, "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    assert FAMILIES["gemma3"].classify(legacy) == (None, [])
    config = Gemma3TextConfig.from_dict(legacy, attn_implementation="eager")
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    ref_BTV, out_BTV, ours, _ = _logits_pair(tmp_path, "gemma3", Gemma3ForCausalLM, config, fields=legacy)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    positions = ours.model.positions
    assert (positions.local_rotary.rope_theta, positions.global_rotary.rope_theta) == (20.0, 900.0)
    assert positions.global_rotary.factor == 4.0


# ---- what the models do besides the logits ----------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_package(tmp_path_factory):
    """A small Gemma 3 built from scratch: 4 layers (local, full, local, full), window 3."""
    return _build(
        tmp_path_factory.mktemp("g3"), "gemma3",
        {"hidden_size": 32, "num_hidden_layers": 4, "sliding_window": 3, "sliding_window_pattern": 2,
         "final_logit_softcapping": 5.0},
    )


def test_packed_documents_give_each_documents_own_logits(gemma3_package):
    model = _import_model(gemma3_package).build_model().eval()
    ids_BT = _ids(257, batch=1, seq=12)
    document_ids_BT = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed_BTV = model(ids_BT, document_ids_BT)
        torch.testing.assert_close(packed_BTV[:, :5], model(ids_BT[:, :5]), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_BTV[:, 5:], model(ids_BT[:, 5:]), atol=1e-5, rtol=0)
        assert (packed_BTV[:, 5:] - model(ids_BT)[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_gradients(gemma3_package, mode):
    build_model = _import_model(gemma3_package).build_model
    ids_BT = _ids(257, batch=2, seq=9)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model()
        if checkpointed:
            assert apply_activation_checkpointing(model, mode=mode) == 4
        model(ids_BT).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_meta_device_build_gets_the_whole_models_values(gemma3_package):
    """What the FSDP2 and pipeline trainers do: build on the meta device, allocate, init_weights()
    gives the values of the model built whole (the offset norms' zeros, both rotary tables)."""
    build_model = _import_model(gemma3_package).build_model
    torch.manual_seed(5)
    whole = build_model()
    torch.manual_seed(5)
    meta = build_model(device="meta")
    meta.to_empty(device="cpu")
    # to_empty() allocates the tied head apart from the embedding; FSDP2 keeps one tensor for
    # both (the fsdp2 trainer run below covers that), so tie them again as it does
    meta.lm_head.weight = meta.model.embed_tokens.weight
    meta.init_weights()
    for name, value in whole.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert torch.equal(meta.model.layers[0].input_layernorm.weight, torch.zeros(32))
    for rotary in ("local_rotary", "global_rotary"):
        assert torch.equal(getattr(meta.model.positions, rotary).inv_freq, getattr(whole.model.positions, rotary).inv_freq)
    ids_BT = _ids(257, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(meta(ids_BT), whole(ids_BT), atol=0, rtol=0)


def test_fgc_explain_counts_the_parameters_and_flops(tmp_path):
    cfg_args = ("-D", "family=gemma3", "-D", "num_hidden_layers=4")
    proc = run_fgc("explain", EXAMPLE, *cfg_args)
    assert proc.returncode == 0, proc.stderr
    package = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", package, *cfg_args, check=True)
    model = _import_model(package).build_model()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in proc.stdout
    flops, _ = model.flops_per_token(128)
    assert "6*N + 12*L*H*T" in proc.stdout and f"{flops:,.0f}" in proc.stdout


# ---- the chunked loss --------------------------------------------------------------------------


def test_the_chunked_loss_is_refused_for_a_soft_capped_head():
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["gemma2"].template, variables={"data_dir": "data", "loss_impl": "chunked"})
    [d] = info.value.diagnostics
    assert "output_projection() of a plain linear head (its head scales or soft-caps the logits)" in d.message
    # without the cap (Gemma, or Gemma 2 with final_logit_softcapping null) it is accepted
    compile_config(FAMILIES["gemma"].template, variables={"data_dir": "data", "loss_impl": "chunked"})
    compile_config(
        FAMILIES["gemma2"].template,
        variables={"data_dir": "data", "loss_impl": "chunked", "final_logit_softcapping": None},
    )


def test_auto_takes_the_reference_loss_for_a_soft_capped_head_with_a_large_vocabulary():
    """auto picks the chunked loss for large logits, but not for a head it cannot compute:
    Gemma 2's 256k vocabulary with its capped logits builds, with the reference loss."""
    variables = {"data_dir": "data", "vocab_size": 256000, "hidden_size": 16, "num_hidden_layers": 2,
                 "batch_size": 4, "seq_len": 128}
    compiled = compile_config(FAMILIES["gemma2"].template, variables=variables)
    loss = compiled.ctx.plan.kernels["cross_entropy"]
    assert loss["impl"] == "torch" and "soft-caps" in loss["reason"], loss
    compiled = compile_config(FAMILIES["gemma"].template, variables=variables)
    assert compiled.ctx.plan.kernels["cross_entropy"]["impl"] == "chunked"


# ---- config.json and knob errors --------------------------------------------------------------


def _fields(config_class, **options) -> dict:
    return _hf_fields(config_class(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, num_hidden_layers=2, **options))


@pytest.mark.parametrize(
    "family, config_class, changes, message",
    [
        ("gemma", GemmaConfig, {"hidden_act": "relu"},
         "hidden_act is 'relu', but fgc's Gemma templates support only 'gelu_pytorch_tanh', 'gelu_new', 'gelu'"),
        ("gemma", GemmaConfig, {"use_bidirectional_attention": True},
         "use_bidirectional_attention is True, but fgc's Gemma templates build causal attention only"),
        ("gemma", GemmaConfig, {"attention_dropout": 0.1},
         "attention_dropout is 0.1, but fgc's gemma template supports only 0.0"),
        ("gemma2", Gemma2Config, {"hidden_activation": "silu"},
         "hidden_activation is 'silu', but fgc's Gemma templates support only"),
        ("gemma2", Gemma2Config, {"layer_types": ["sliding_attention", "chunked_attention"]},
         "layer_types has 'chunked_attention'; fgc's Gemma templates have sliding_attention and full_attention"),
        ("gemma2", Gemma2Config, {"layer_types": ["full_attention"]},
         "layer_types must be a list of one layer type per layer"),
        ("gemma2", Gemma2Config, {"sliding_window": None},
         "sliding_window is null, but the model has sliding_attention layers"),
        ("gemma2", Gemma2Config, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}},
         "rope_parameters has rope_type 'longrope'"),
        ("gemma3", Gemma3TextConfig, {"attn_logit_softcapping": 50.0},
         "attn_logit_softcapping is 50.0: transformers' Gemma3ForCausalLM does not apply it"),
        ("gemma3", Gemma3TextConfig,
         {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1.0},
                              "full_attention": {"rope_type": "longrope", "rope_theta": 1.0}}},
         "the full_attention layers' rope_type is 'longrope'"),
        ("gemma3", Gemma3TextConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
         "rope_parameters must map sliding_attention and full_attention"),
        ("gemma3", Gemma3TextConfig, {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1.0},
                                                          "full_attention": {"rope_type": "default"}}},
         "the full-attention layers' rope_theta is not stated"),
    ],
)
def test_a_config_json_field_the_template_cannot_represent_is_an_error(family, config_class, changes, message):
    config = {**_fields(config_class), **changes}
    problem, _ = FAMILIES[family].classify(config)
    assert problem is not None and problem.startswith(message), problem


def test_fields_transformers_does_not_read_are_notes_not_knobs():
    # Gemma has no mlp_bias, Gemma 2 reads hidden_activation, not hidden_act: neither changes
    # transformers' model, so neither may change fgc's
    assert FAMILIES["gemma"].classify({**_fields(GemmaConfig), "mlp_bias": True}) == (None, ["mlp_bias"])
    assert FAMILIES["gemma2"].classify({**_fields(Gemma2Config), "hidden_act": "silu"}) == (None, ["hidden_act"])
    assert FAMILIES["gemma3"].classify(_fields(Gemma3TextConfig)) == (None, [])


@pytest.mark.parametrize(
    "family, variables, message",
    [
        ("gemma", {"hidden_act": "relu"}, "hidden activation relu is not supported"),
        ("gemma2", {"layer_types": ["full_attention"]}, "layer_types has 1 entries for num_hidden_layers 4"),
        ("gemma2", {"layer_types": ["full_attention", "x", "x", "x"]}, "layer_types: x is not a layer type"),
        ("gemma2", {"sliding_window": None}, "sliding_window is null, but layer_types has sliding_attention layers"),
        ("gemma2", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number, got 0"),
        ("gemma3", {"sliding_window_pattern": 0}, "sliding_window_pattern must be a positive integer, got 0"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0: transformers' Gemma 3 does not"),
        ("gemma3", {"rope_scaling": {"rope_type": "longrope"}}, "global_rotary: rope_type longrope is not supported"),
    ],
)
def test_knob_errors_name_the_template_line(family, variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES[family].template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.line is not None and d.loc.file.endswith(".yaml")


def test_the_cli_names_the_field_of_a_config_json(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**_fields(Gemma3TextConfig), "attn_logit_softcapping": 30.0}))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("examples/hf_finetune/finetune.yaml:12: error:")
    assert "attn_logit_softcapping is 30.0" in first
    assert not (tmp_path / "pkg").exists()


# ---- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, architecture", [
    ("gemma", "GemmaForCausalLM"), ("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"),
])
def test_a_model_built_from_scratch_exports_as_its_family(tmp_path, family, architecture):
    """The package's hf_config.json names the family's class, and transformers' model of that
    config with fgc's weights computes fgc's logits."""
    variables = {"hidden_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 2, "sliding_window": 4,
                 "max_position_embeddings": 64}
    if family == "gemma":
        variables = {k: v for k, v in variables.items() if k != "sliding_window"}
    package = _build(tmp_path, family, variables)
    spec = json.loads((package / "hf_config.json").read_text())
    assert spec["remote_code"] is False and spec["config"]["architectures"] == [architecture]
    assert spec["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    ours = _import_model(package).build_model().eval()
    with torch.no_grad():  # offset norm weights away from their zero start
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) - 0.5)
    config = AutoModelForCausalLM.from_config  # transformers' class of the exported config
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(**spec["config"])
    hf_config._attn_implementation = "eager"
    hf = config(hf_config).eval()
    assert type(hf).__name__ == architecture
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids_BT = _ids(257, seq=11)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids_BT).logits, ours(ids_BT), atol=1e-5, rtol=0)


def test_a_model_changed_from_its_config_json_is_not_exported_as_it(tmp_path):
    """The exporter keeps an imported config.json's fields it does not restate: a knob changed
    with -D (here the logit cap) must not leave the old value in an export of the family's class."""
    fields = _fields(Gemma2Config)
    build = lambda variables: compile_config(  # noqa: E731
        FAMILIES["gemma2"].template, variables={"data_dir": "data", "hf_fields": fields, **variables}
    )
    from fgc_lowering.construct import meta_model

    compiled = build({})
    assert export_spec(meta_model(compiled.ir, compiled.ctx), fields)["config"]["architectures"] == ["Gemma2ForCausalLM"]
    compiled = build({"final_logit_softcapping": 10.0})
    spec = export_spec(meta_model(compiled.ir, compiled.ctx), fields)
    assert spec["remote_code"] is True


# ---- the fine-tune round trip and the trainers (slow) ----------------------------------------------

VOCAB = 300


def _save_tiny(family: str, out: Path) -> Path:
    """A tiny random model of FAMILY saved with transformers (fp32), its norm weights non-zero."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=256, pad_token_id=0)
    if family == "gemma":
        config, cls = GemmaConfig(**common), GemmaForCausalLM
    elif family == "gemma2":
        config, cls = Gemma2Config(**common, sliding_window=8, final_logit_softcapping=5.0), Gemma2ForCausalLM
    else:
        config = Gemma3TextConfig(**common, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16)
        cls = Gemma3ForCausalLM
    model = _hf_model(cls, config)
    model.save_pretrained(out)
    return out


def _ids_file(tmp_path: Path) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def _hf_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_one_step_at_lr_0_exports_the_original_model(tmp_path, family):
    """Import, one step at learning rate 0, export: transformers loads the family's own class and
    gives back the original logits exactly."""
    src = _save_tiny(family, tmp_path / "hf")
    shards = tmp_path / "shards"
    run_fgc("data", EXAMPLE.parent / "corpus.txt", "-o", shards, check=True)
    pkg = tmp_path / "pkg"
    run_fgc("build", FINETUNE, "-o", pkg, "-D", f"model_dir={src}", "-D", f"data_dir={shards}", "-D", "seq_len=32",
            "-D", "batch_size=4", "-D", "lr=0", check=True)
    proc = _train(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = _ids_file(tmp_path)
    original, expected = _hf_logits(src, ids)
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        model, got = _hf_logits(out, ids)
        assert type(model) is type(original)
        assert torch.equal(got, expected)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        exported = json.loads((out / "config.json").read_text())
        assert exported["model_type"] == FAMILIES[family].model_type


# Each from-scratch run: the tiny example (-D family=NAME), a few steps on 2 ranks.
TRAINER_RUNS = {
    "gemma ddp": ("gemma", ["-D", "trainer_type=ddp"]),
    "gemma2 ddp, checkpointed": ("gemma2", ["-D", "trainer_type=ddp", "-D", "activation_checkpointing=full",
                                            "-D", "sliding_window=16"]),
    "gemma3 ddp": ("gemma3", ["-D", "trainer_type=ddp", "-D", "sliding_window=16", "-D", "sliding_window_pattern=2"]),
    "gemma3 fsdp2": ("gemma3", ["-D", "trainer_type=fsdp2", "-D", "sliding_window=16", "-D", "sliding_window_pattern=2"]),
    "gemma2 tensor parallel": ("gemma2", ["-D", "trainer_type=fsdp2", "-D", "tensor_degree=2",
                                          "-D", "sliding_window=16"]),
    # the pipeline trainer refuses a head tied to an embedding on another stage
    "gemma3 pipeline": ("gemma3", ["-D", "trainer_type=pipeline", "-D", "sliding_window=16",
                                   "-D", "sliding_window_pattern=2", "-D", "num_hidden_layers=4",
                                   "-D", "tie_word_embeddings=false"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(TRAINER_RUNS))
def test_the_example_trains_from_scratch(tmp_path, run):
    family, flags = TRAINER_RUNS[run]
    pkg = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", pkg, "-D", f"family={family}", "-D", "max_steps=4", "-D", "log_every=1",
            "-D", "eval_every=0", "-D", "batch_size=4", "-D", "seq_len=64", *flags, check=True)
    train = (pkg / "train.py").read_text()
    if "fsdp2" in run or "pipeline" in run:
        assert 'model = build_model(device="meta")' in train
    proc = _train(pkg, "--output-dir", tmp_path / "run", torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(257), abs=0.5)  # a fresh model: near-uniform predictions
    assert losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == FAMILIES[family].model_type
