"""The Granite family (lm/granite.yaml) against transformers' GraniteForCausalLM.

Each logits test makes a tiny random model with transformers' config class (no downloads), builds
the family template with the config's fields as `hf_fields`, loads transformers' state dict into
`build_model()` and compares the logits in fp32 at atol 1e-5 (transformers' eager attention).
Every multiplier is far from 1, and each is shown to matter: set to 1 in fgc's model (the value
a template that forgot it would use), the logits differ.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM

from family_checks import (
    config_json_error, differs, exports_as_its_family, features_besides_logits, hf_fields, logits,
    logits_pair, round_trip, train_example,
)
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=112,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    attn_implementation="eager",
)
MULTIPLIERS = dict(embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.3, logits_scaling=4.0)

CASES = {
    "multipliers": dict(num_hidden_layers=2, **MULTIPLIERS),
    "multipliers, biases, tied, linear rope": dict(
        num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, **MULTIPLIERS,
    ),
    # Granite 3's config.json files train with attention dropout (none in eval, as here)
    "multipliers, attention dropout": dict(num_hidden_layers=2, attention_dropout=0.1, **MULTIPLIERS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_granite_logits_match_transformers(tmp_path, case):
    config = GraniteConfig(**SMALL, **CASES[case])
    ref_BTV, out_BTV, ours, _ = logits_pair(tmp_path, "granite", GraniteForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layers = list(ours.decoder_layers())
    assert {type(layer).__name__ for layer in layers} == {"GraniteDecoderLayer"}
    assert [layer.residual_multiplier for layer in layers] == [0.3, 0.3]
    assert [layer.self_attn.scaling for layer in layers] == [0.05, 0.05]
    assert (ours.model.embedding_multiplier, ours.logits_scaling) == (6.0, 4.0)
    assert ours.output_projection() is None  # the chunked loss cannot compute a scaled head
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config.tie_word_embeddings
    assert (layers[0].self_attn.o_proj.bias is not None) == config.attention_bias
    assert (layers[0].mlp.down_proj.bias is not None) == config.mlp_bias
    assert [layer.self_attn.attention_dropout for layer in layers] == [config.attention_dropout] * 2
    # each multiplier matters: at 1 (attention_multiplier: Llama's head_dim ** -0.5), the logits differ
    off = {
        "embedding_multiplier": [(ours.model, "embedding_multiplier", None)],
        "logits_scaling": [(ours, "logits_scaling", 1.0)],
        "residual_multiplier": [(layer, "residual_multiplier", 1.0) for layer in layers],
        "attention_multiplier": [(layer.self_attn, "scaling", None) for layer in layers],
    }
    for name, changes in off.items():
        kept = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
        for obj, attr, value in changes:
            setattr(obj, attr, value)
        assert differs(ours, ref_BTV), name
        for obj, attr, value in kept:
            setattr(obj, attr, value)
        torch.testing.assert_close(logits(ours), ref_BTV, atol=1e-5, rtol=0)


def test_granite_config_json_without_attention_multiplier_scales_by_1(tmp_path):
    """GraniteConfig's attention_multiplier defaults to 1.0 (not Llama's head_dim ** -0.5): a
    config.json that leaves it out gets fgc's scale 1.0 too; built from scratch it is Llama's."""
    fields = {k: v for k, v in hf_fields(GraniteConfig(**SMALL, num_hidden_layers=2)).items()
              if k != "attention_multiplier"}
    config = GraniteConfig.from_dict(fields, attn_implementation="eager")
    assert config.attention_multiplier == 1.0
    ref_BTV, out_BTV, ours, _ = logits_pair(tmp_path, "granite", GraniteForCausalLM, config, fields=fields)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    assert ours.model.layers[0].self_attn.scaling == 1.0
    compiled = compile_config(FAMILIES["granite"].template, variables={"data_dir": "data"})
    assert "scaling:" not in compiled.rendered.text


# ---- config.json fields and knobs ----------------------------------------------------------------


def _fields(**options) -> dict:
    return hf_fields(GraniteConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, **options))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's granite template supports only 'silu'"),
        ({"attention_dropout": 1.0}, "attention_dropout must be a number in [0, 1), got 1.0"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters has rope_type 'longrope'"),
        ({"embedding_multiplier": "12"}, "embedding_multiplier must be a number, got '12'"),
        ({"residual_multiplier": None}, "residual_multiplier must be a number, got None"),
        ({"attention_multiplier": True}, "attention_multiplier must be a number, got True"),
        ({"logits_scaling": 0}, "logits_scaling must not be 0: the logits are divided by it"),
    ],
)
def test_granite_config_fields_it_cannot_represent_are_errors(changes, message):
    problem, _ = FAMILIES["granite"].classify({**_fields(), **changes})
    assert problem is not None and problem.startswith(message), problem


def test_granite_metadata_fields_are_notes():
    assert FAMILIES["granite"].classify(_fields(**MULTIPLIERS)) == (None, [])
    # transformers' Granite has no sliding window or layer types
    extra = {"sliding_window": 4, "layer_types": ["sliding_attention"] * 2, "unsloth_version": "2024.9"}
    assert FAMILIES["granite"].classify({**_fields(), **extra}) == (None, sorted(extra))


def test_granite_config_json_errors_name_the_field_at_the_hf_config_line(tmp_path):
    first = config_json_error(tmp_path, {**_fields(), "logits_scaling": 0.0})
    assert "logits_scaling must not be 0" in first


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"residual_multiplier": "x"}, "residual_multiplier must be a number, got x"),
        ({"logits_scaling": 0}, "logits_scaling must not be 0: the logits are divided by it"),
        ({"attention_dropout": 1.5}, "attention_dropout must be a number in [0, 1), got 1.5"),
    ],
)
def test_granite_knob_errors_name_the_template_line(variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["granite"].template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.line is not None and d.loc.file.endswith(".yaml")


def test_granite_chunked_loss_is_refused_for_its_scaled_head():
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["granite"].template, variables={"data_dir": "data", "loss_impl": "chunked",
                                                                "logits_scaling": 8.0})
    [d] = info.value.diagnostics
    assert "output_projection() of a plain linear head" in d.message


# ---- export ------------------------------------------------------------------------------------


def test_granite_built_from_scratch_exports_as_granite(tmp_path):
    config = exports_as_its_family(tmp_path, "granite", {
        "hidden_size": 32, "num_hidden_layers": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "attention_bias": True, **MULTIPLIERS,
    })
    assert {name: config[name] for name in MULTIPLIERS} == MULTIPLIERS
    # the default attention scale, written out: transformers' Granite reads it from the field
    config = exports_as_its_family(tmp_path / "default", "granite", {"hidden_size": 32, "num_hidden_layers": 2})
    assert config["attention_multiplier"] == 8**-0.5 and config["residual_multiplier"] == 1.0
    assert config["attention_dropout"] == 0.0
    config = exports_as_its_family(tmp_path / "dropout", "granite", {"hidden_size": 32, "num_hidden_layers": 2,
                                                                     "attention_dropout": 0.1})
    assert config["attention_dropout"] == 0.1


# ---- what the model does besides the logits ----------------------------------------------------


def test_granite_documents_checkpointing_meta_init_and_explain(tmp_path):
    """Granite's own decoder layer under checkpointing and the meta-device build."""
    features_besides_logits(tmp_path, "granite", ["-D", "embedding_multiplier=3.0", "-D", "residual_multiplier=0.5",
                                                  "-D", "logits_scaling=2.0", "-D", "attention_multiplier=0.1"])


# ---- the fine-tune round trip and the trainers (slow) ----------------------------------------


@pytest.mark.slow
def test_granite_one_step_at_lr_0_exports_the_original_model(tmp_path):
    config = GraniteConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=256,
                           pad_token_id=0, **MULTIPLIERS)
    # a 2-stage pipeline: the embedding multiplier on the first stage, the logits scaling on the last
    exported = round_trip(tmp_path, GraniteForCausalLM, config, "GraniteForCausalLM",
                          sharded=[["-D", "trainer_type=pipeline"]])
    assert {name: exported[name] for name in MULTIPLIERS} == MULTIPLIERS


@pytest.mark.slow
def test_granite_the_example_trains_from_scratch_with_pipeline(tmp_path):
    """The embedding multiplier on the first stage, the residual ones in every layer, the logits
    scaling on the last."""
    config = train_example(tmp_path, "granite", ["-D", "trainer_type=pipeline", "-D", "num_hidden_layers=4",
                                                 "-D", "embedding_multiplier=2.0", "-D", "residual_multiplier=0.5",
                                                 "-D", "logits_scaling=2.0", "-D", "attention_multiplier=0.2"])
    assert (config["embedding_multiplier"], config["residual_multiplier"]) == (2.0, 0.5)
    assert (config["logits_scaling"], config["attention_multiplier"]) == (2.0, 0.2)

