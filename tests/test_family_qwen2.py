"""The Qwen2 family (lm/qwen2.yaml) against transformers' Qwen2ForCausalLM.

Each logits test makes a tiny random model with transformers' config class (no downloads), builds
the family template with the config's fields as `hf_fields`, loads transformers' state dict into
`build_model()` and compares the logits in fp32 at atol 1e-5 (transformers' eager attention).
Each feature is also shown to matter: turned off in fgc's model, the logits differ.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from family_checks import (
    config_json_error, differs, exports_as_its_family, features_besides_logits, hf_fields, hf_model, logits,
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

CASES = {
    # no window: every layer full attention, tied embeddings, linear rope
    "full attention": dict(
        num_hidden_layers=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    ),
    # transformers' default rule: the layers from max_window_layers on slide (window 5 < SEQ)
    "max_window_layers": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    # layer_types given: they win over max_window_layers
    "layer_types": dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    # a window stated but not used: use_sliding_window false
    "unused window": dict(num_hidden_layers=2, use_sliding_window=False, sliding_window=3, max_window_layers=0),
}
WINDOWS = {  # each layer's window
    "full attention": [None, None],
    "max_window_layers": [None, None, 5, 5],
    "layer_types": [4, None, 4],
    "unused window": [None, None],
}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen2_logits_match_transformers(tmp_path, case):
    config = Qwen2Config(**SMALL, **CASES[case])
    ref_BTV, out_BTV, ours, _ = logits_pair(tmp_path, "qwen2", Qwen2ForCausalLM, config)
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    layers = list(ours.decoder_layers())
    windows = [layer.self_attn.sliding_window for layer in layers]
    assert windows == [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    assert windows == WINDOWS[case]
    for layer in layers:
        attn = layer.self_attn
        assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
        assert attn.o_proj.bias is None and layer.mlp.gate_proj.bias is None
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config.tie_word_embeddings
    # each feature matters: the q, k, v biases; the windows
    for layer in layers:
        layer.self_attn.q_proj.bias.data.zero_()
    assert differs(ours, ref_BTV)
    if any(windows):
        ours.load_state_dict(hf_model(Qwen2ForCausalLM, config).state_dict(), strict=True)
        torch.testing.assert_close(logits(ours), ref_BTV, atol=1e-5, rtol=0)
        for layer in layers:
            layer.self_attn.sliding_window = None
        assert differs(ours, ref_BTV)


# ---- config.json fields and knobs ----------------------------------------------------------------


def _fields(**options) -> dict:
    return hf_fields(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2, **options))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's qwen2 template supports only 'silu'"),
        ({"attention_dropout": 0.1}, "attention_dropout is 0.1, but fgc's qwen2 template supports only 0.0"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters has rope_type 'longrope'"),
        ({"layer_types": ["full_attention", "chunked_attention"]},
         "layer_types has 'chunked_attention'; fgc's qwen2 template has only full_attention and sliding_attention"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries, but num_hidden_layers is 2"),
        ({"layer_types": ["full_attention", "sliding_attention"]},
         "layer_types has 'sliding_attention', but use_sliding_window is not true or sliding_window is null"),
        ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
        ({"max_window_layers": "all"}, "max_window_layers must be an integer, got 'all'"),
    ],
)
def test_qwen2_config_fields_it_cannot_represent_are_errors(changes, message):
    problem, _ = FAMILIES["qwen2"].classify({**_fields(), **changes})
    assert problem is not None and problem.startswith(message), problem


def test_qwen2_fields_transformers_does_not_read_are_notes():
    # transformers' Qwen2 has no o_proj or MLP biases and reads no attention_bias or mlp_bias:
    # they cannot change its model, so they are notes, and fgc's model keeps its fixed biases
    assert FAMILIES["qwen2"].classify(_fields()) == (None, [])
    extra = {"attention_bias": True, "mlp_bias": True, "unsloth_version": "2024.9"}
    assert FAMILIES["qwen2"].classify({**_fields(), **extra}) == (None, sorted(extra))
    # a window that use_sliding_window false leaves unused is accepted
    assert FAMILIES["qwen2"].classify(_fields(use_sliding_window=False, sliding_window=3)) == (None, [])


def test_qwen2_config_json_errors_name_the_field_at_the_hf_config_line(tmp_path):
    first = config_json_error(tmp_path, {**_fields(), "layer_types": ["full_attention", "sliding_attention"]})
    assert "layer_types has 'sliding_attention'" in first


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"attention_bias": True}, "qwen2 has biases on q, k and v only: attention_bias and mlp_bias cannot be set"),
        ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
        ({"layer_types": ["full_attention"]}, "layer_types must list one of full_attention, sliding_attention per layer"),
        ({"max_window_layers": "all"}, "max_window_layers must be an integer, got all"),
        ({"use_sliding_window": True, "layer_types": ["full_attention", "x", "full_attention", "full_attention"]},
         "layer_types has x; qwen2 has only full_attention and sliding_attention layers"),
    ],
)
def test_qwen2_knob_errors_name_the_template_line(variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["qwen2"].template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.line is not None and d.loc.file.endswith(".yaml")


# ---- export ------------------------------------------------------------------------------------


def test_qwen2_built_from_scratch_exports_as_qwen2(tmp_path):
    """Windows on layers 1 and 3 only: the export states each layer's kind."""
    config = exports_as_its_family(tmp_path, "qwen2", {
        "hidden_size": 32, "num_hidden_layers": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "use_sliding_window": True, "sliding_window": 4,
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    })
    assert (config["use_sliding_window"], config["sliding_window"]) == (True, 4)
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    # and without a window: every layer full attention
    config = exports_as_its_family(tmp_path / "full", "qwen2", {"hidden_size": 32, "num_hidden_layers": 2})
    assert (config["use_sliding_window"], config["layer_types"]) == (False, ["full_attention"] * 2)


def test_qwen2_export_refuses_what_qwen2_cannot_say(tmp_path):
    """A model with biases on o_proj (a Llama's attention_bias) is not a Qwen2: exported as a Llama."""
    from fgc_lowering.construct import meta_model
    from fgc.hf import export_spec

    compiled = compile_config(FAMILIES["llama"].template, variables={"data_dir": "data", "attention_bias": True})
    spec = export_spec(meta_model(compiled.ir, compiled.ctx), None)
    assert spec["config"]["architectures"] == ["LlamaForCausalLM"]
    compiled = compile_config(FAMILIES["qwen2"].template, variables={"data_dir": "data"})
    assert export_spec(meta_model(compiled.ir, compiled.ctx), None)["config"]["architectures"] == ["Qwen2ForCausalLM"]


# ---- what the model does besides the logits ----------------------------------------------------


def test_qwen2_documents_checkpointing_meta_init_and_explain(tmp_path):
    """A window of 3 on layers 1 and 2: each packed document still sees only itself."""
    features_besides_logits(tmp_path, "qwen2", ["-D", "use_sliding_window=true", "-D", "sliding_window=3",
                                                "-D", "max_window_layers=1"])


# ---- the fine-tune round trip and the trainers (slow) ----------------------------------------


@pytest.mark.slow
def test_qwen2_one_step_at_lr_0_exports_the_original_model(tmp_path):
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
                         max_window_layers=1, bos_token_id=1, eos_token_id=256, pad_token_id=0)
    # tensor parallelism splits the biased q, k and v column-wise: each rank loads its share of
    # the weights and biases, and the export gathers them back
    exported = round_trip(tmp_path, Qwen2ForCausalLM, config, "Qwen2ForCausalLM",
                          sharded=[["-D", "trainer_type=fsdp2", "-D", "tensor_degree=2"]])
    assert exported["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert exported["sliding_window"] == 6


@pytest.mark.slow
def test_qwen2_the_example_trains_from_scratch_with_ddp(tmp_path):
    """Sliding layers from max_window_layers on, checkpointed, on 2 DDP ranks."""
    config = train_example(tmp_path, "qwen2", ["-D", "trainer_type=ddp", "-D", "use_sliding_window=true",
                                               "-D", "sliding_window=16", "-D", "max_window_layers=1",
                                               "-D", "activation_checkpointing=full"])
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]

