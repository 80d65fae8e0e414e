"""The SmolLM3 family (lm/smollm3.yaml) against transformers' SmolLM3ForCausalLM.

Each logits test makes a tiny random model with transformers' config class (no downloads), builds
the family template with the config's fields as `hf_fields`, loads transformers' state dict into
`build_model()` and compares the logits in fp32 at atol 1e-5 (transformers' eager attention).
Each feature is also shown to matter: turned off in fgc's model, the logits differ.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import pytest
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

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
    pad_token_id=0,  # transformers' defaults are SmolLM3's ids, outside this vocabulary
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)

CASES = {
    # transformers' default rule: every 4th layer (layer 3) without rotary; tied embeddings
    "no_rope_layer_interval": dict(num_hidden_layers=4),
    # an interval of 2, the layers without rotary sliding (window 5 < SEQ), biases, untied
    "sliding nope layers": dict(
        num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
    ),
    # both lists given: a sliding layer with rotary, a full one without
    "no_rope_layers and layer_types": dict(
        num_hidden_layers=3, no_rope_layers=[0, 1, 1], use_sliding_window=True, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    ),
}
EXPECTED = {  # (each layer's rotary, each layer's window)
    "no_rope_layer_interval": ([True, True, True, False], [None] * 4),
    "sliding nope layers": ([True, False, True, False], [None, 5, None, 5]),
    "no_rope_layers and layer_types": ([False, True, True], [None, 4, None]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smollm3_logits_match_transformers(tmp_path, case):
    config = SmolLM3Config(**SMALL, **CASES[case])
    ref_BTV, out_BTV, ours, _ = logits_pair(tmp_path, "smollm3", SmolLM3ForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layers = list(ours.decoder_layers())
    rope = [layer.self_attn.use_rope for layer in layers]
    windows = [layer.self_attn.sliding_window for layer in layers]
    assert (rope, windows) == EXPECTED[case]
    assert rope == [bool(flag) for flag in config.no_rope_layers]
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config.tie_word_embeddings
    assert (layers[0].self_attn.o_proj.bias is not None) == config.attention_bias
    assert (layers[0].mlp.down_proj.bias is not None) == config.mlp_bias
    # each feature matters: the layers without rotary, the windows
    for layer in layers:
        layer.self_attn.use_rope = True
    assert differs(ours, ref_BTV)
    if any(windows):
        for layer, flag in zip(layers, rope):
            layer.self_attn.use_rope = flag
        torch.testing.assert_close(logits(ours), ref_BTV, atol=1e-5, rtol=0)
        for layer in layers:
            layer.self_attn.sliding_window = None
        assert differs(ours, ref_BTV)


def test_smollm3_config_json_of_few_fields_gets_smollm3s_defaults(tmp_path):
    """A config.json that states neither rope_theta nor tie_word_embeddings: transformers'
    SmolLM3Config gives rope_theta 2000000.0 and tied embeddings, and so does fgc's template."""
    fields = {"model_type": "smollm3", **{k: v for k, v in SMALL.items() if k != "attn_implementation"},
              "num_hidden_layers": 4, "max_position_embeddings": 4096}
    assert FAMILIES["smollm3"].classify(fields) == (None, [])
    config = SmolLM3Config.from_dict(fields, attn_implementation="eager")
    assert config.rope_parameters["rope_theta"] == 2000000.0 and config.tie_word_embeddings
    ref_BTV, out_BTV, ours, _ = logits_pair(tmp_path, "smollm3", SmolLM3ForCausalLM, config, fields=fields)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    assert ours.model.positions.rope_theta == 2000000.0
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


# ---- config.json fields and knobs ----------------------------------------------------------------


def _fields(**options) -> dict:
    return hf_fields(SmolLM3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, **options))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's smollm3 template supports only 'silu'"),
        ({"attention_dropout": 0.1}, "attention_dropout is 0.1, but fgc's smollm3 template supports only 0.0"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters has rope_type 'longrope'"),
        ({"no_rope_layers": [1]}, "no_rope_layers has 1 entries, but num_hidden_layers is 2"),
        ({"no_rope_layers": [1, 2]}, "no_rope_layers must hold 1 (the layer uses rotary positions) or 0 per layer"),
        ({"no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval must be a positive integer, got 0"),
        ({"layer_types": ["full_attention", "chunked_attention"]},
         "layer_types has 'chunked_attention'; fgc's smollm3 template has only full_attention and sliding_attention"),
        # transformers' SmolLM3 would give such a layer a sliding mask but no window (eager and
        # SDPA disagree): no model fgc could build
        ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
         "layer_types has 'sliding_attention', but use_sliding_window is not true or sliding_window is null"),
        ({"sliding_window": -1}, "sliding_window must be a positive integer, got -1"),
    ],
)
def test_smollm3_config_fields_it_cannot_represent_are_errors(changes, message):
    problem, _ = FAMILIES["smollm3"].classify({**_fields(), **changes})
    assert problem is not None and problem.startswith(message), problem


def test_smollm3_metadata_fields_are_notes():
    assert FAMILIES["smollm3"].classify(_fields()) == (None, [])
    # Qwen2's max_window_layers and Llama's pretraining_tp are not read by transformers' SmolLM3
    extra = {"max_window_layers": 2, "pretraining_tp": 2, "unsloth_version": "2024.9"}
    assert FAMILIES["smollm3"].classify({**_fields(), **extra}) == (None, sorted(extra))


def test_smollm3_config_json_errors_name_the_field_at_the_hf_config_line(tmp_path):
    first = config_json_error(tmp_path, {**_fields(), "no_rope_layers": [1, 0, 1]})
    assert "no_rope_layers has 3 entries, but num_hidden_layers is 2" in first


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"no_rope_layers": [1, 0]}, "no_rope_layers must list 1 (rotary) or 0 (none) per layer (num_hidden_layers 4)"),
        ({"no_rope_layers": [1, 0, 2, 1]}, "no_rope_layers must list 1 (rotary) or 0 (none) per layer, got"),
        ({"no_rope_layer_interval": 0}, "no_rope_layer_interval must be a positive integer, got 0"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
        ({"layer_types": ["sliding_attention"] * 4}, "layer_types has sliding_attention, but use_sliding_window is not true"),
    ],
)
def test_smollm3_knob_errors_name_the_template_line(variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["smollm3"].template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.line is not None and d.loc.file.endswith(".yaml")


# ---- export ------------------------------------------------------------------------------------


def test_smollm3_built_from_scratch_exports_as_smollm3(tmp_path):
    """Layers without rotary (every 2nd) that slide: the export states both per layer."""
    config = exports_as_its_family(tmp_path, "smollm3", {
        "hidden_size": 32, "num_hidden_layers": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 4, "attention_bias": True,
    })
    assert config["no_rope_layers"] == [1, 0, 1, 0]
    assert config["layer_types"] == ["full_attention", "sliding_attention"] * 2
    assert (config["use_sliding_window"], config["sliding_window"], config["attention_bias"]) == (True, 4, True)


def test_a_smollm3_whose_every_layer_rotates_is_a_llama(tmp_path):
    """Built from scratch with fewer layers than no_rope_layer_interval, the model is a Llama
    (same parts, same function) and is exported as one; imported from a SmolLM3 config.json it
    stays a SmolLM3."""
    from fgc_lowering.construct import meta_model
    from fgc.hf import export_spec

    compiled = compile_config(FAMILIES["smollm3"].template, variables={"data_dir": "data", "num_hidden_layers": 3})
    model = meta_model(compiled.ir, compiled.ctx)
    assert all(layer.self_attn.use_rope for layer in model.model.layers)
    assert export_spec(model, None)["config"]["architectures"] == ["LlamaForCausalLM"]
    fields = _fields(no_rope_layers=[1, 1])
    compiled = compile_config(FAMILIES["smollm3"].template, variables={"data_dir": "data", "hf_fields": fields})
    spec = export_spec(meta_model(compiled.ir, compiled.ctx), fields)
    assert spec["config"]["architectures"] == ["SmolLM3ForCausalLM"] and spec["config"]["no_rope_layers"] == [1, 1]


# ---- what the model does besides the logits ----------------------------------------------------


def test_smollm3_documents_checkpointing_meta_init_and_explain(tmp_path):
    """Layers 1 and 3 without rotary and sliding (window 3)."""
    features_besides_logits(tmp_path, "smollm3", ["-D", "num_hidden_layers=4", "-D", "no_rope_layer_interval=2",
                                                  "-D", "use_sliding_window=true", "-D", "sliding_window=3"])


# ---- the fine-tune round trip and the trainers (slow) ----------------------------------------


@pytest.mark.slow
def test_smollm3_one_step_at_lr_0_exports_the_original_model(tmp_path):
    config = SmolLM3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, no_rope_layer_interval=2,
                           use_sliding_window=True, sliding_window=6, bos_token_id=1, eos_token_id=256, pad_token_id=0)
    exported = round_trip(tmp_path, SmolLM3ForCausalLM, config, "SmolLM3ForCausalLM",
                          sharded=[["-D", "trainer_type=fsdp2"]])
    assert exported["no_rope_layers"] == [1, 0, 1, 0]
    assert exported["layer_types"] == ["full_attention", "sliding_attention"] * 2


@pytest.mark.slow
def test_smollm3_the_example_trains_from_scratch_with_fsdp2(tmp_path):
    """FSDP2 builds on the meta device; 4 layers: layer 3 without rotary (and sliding)."""
    config = train_example(tmp_path, "smollm3", ["-D", "trainer_type=fsdp2", "-D", "num_hidden_layers=4",
                                                 "-D", "use_sliding_window=true", "-D", "sliding_window=16"])
    assert config["no_rope_layers"] == [1, 1, 1, 0]
    assert config["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"]

