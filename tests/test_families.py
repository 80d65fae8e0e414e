"""The family templates (lm/llama.yaml, lm/mistral.yaml, lm/qwen3.yaml) against transformers.

Each test makes a tiny random model with transformers' config class (no downloads), builds the
family template with the config's fields as `hf_fields`, imports the generated `model.py`, loads
transformers' state dict into `build_model()` and compares the logits in fp32 at atol 1e-5.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import run_fgc
from family_checks import hf_fields as _hf_fields, ids as _ids
from fgc.build import build_package, compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=112,
    rms_norm_eps=1e-6,
    attn_implementation="eager",  # an independent reference for our SDPA path
)
SEQ = 37


def _hf_model(model_class, config):
    """A transformers model with every weight random (norm scales too), in eval mode."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _build(tmp_path: Path, config: str | Path, variables: dict | None = None) -> Path:
    """Build CONFIG (a family name or a config file) in this process, without the smoke check."""
    if isinstance(config, str):
        config = FAMILIES[config].template
    out = tmp_path / "pkg"
    build_package(compile_config(config, variables={"data_dir": "data", **(variables or {})}), out, smoke=False)
    return out


def _import_model(package: Path):
    spec = importlib.util.spec_from_file_location(f"model_{package.name}", package / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits_pair(tmp_path, family, model_class, config, variables=None):
    hf = _hf_model(model_class, config)
    package = _build(tmp_path, family, {"hf_fields": _hf_fields(config), **(variables or {})})
    ours = _import_model(package).build_model().eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids_BT = _ids(config.vocab_size)
    with torch.no_grad():
        return hf(ids_BT).logits, ours(ids_BT), ours, package


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 8.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_CASES))
def test_llama_logits_match_transformers_for_each_rope_type(tmp_path, rope):
    # max_position_embeddings 32 < SEQ, so dynamic NTK rescales; yarn's implied factor is 32 / 8
    config = LlamaConfig(**SMALL, max_position_embeddings=32, rope_theta=500.0, rope_scaling=ROPE_CASES[rope])
    ref_BTV, out_BTV, ours, _ = _logits_pair(tmp_path, "llama", LlamaForCausalLM, config)
    expected_class = {
        "default": "RotaryEmbedding",
        "linear": "LinearScalingRotaryEmbedding",
        "dynamic": "DynamicNTKRotaryEmbedding",
        "yarn": "YarnRotaryEmbedding",
        "llama3": "Llama3RotaryEmbedding",
    }[rope]
    assert type(ours.model.positions).__name__ == expected_class
    assert ours.model.positions.rope_theta == 500.0
    assert out_BTV.shape == (2, SEQ, 97) and out_BTV.dtype == torch.float32
    assert ref_BTV.abs().max() > 0.1  # not a vacuous comparison of near-zero logits
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    if rope != "default":
        # the scaling matters for these inputs: default RoPE would not match
        plain = LlamaConfig(**SMALL, max_position_embeddings=32, rope_theta=500.0)
        with torch.no_grad():
            plain_BTV = _hf_model(LlamaForCausalLM, plain)(_ids(97)).logits
        assert (plain_BTV - ref_BTV).abs().max() > 1e-3


def test_mistral_sliding_window_shorter_than_the_sequence_matches_transformers(tmp_path):
    config = MistralConfig(**SMALL, sliding_window=5, max_position_embeddings=64, head_dim=24)
    ref_BTV, out_BTV, ours, package = _logits_pair(tmp_path, "mistral", MistralForCausalLM, config)
    attn = ours.model.layers[0].self_attn
    assert attn.sliding_window == 5 and attn.head_dim == 24
    assert "sliding_window=5" in (package / "model.py").read_text().split("def build_model")[1]
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)
    # The window matters: without it the logits differ (beyond the first 5 positions only).
    for layer in ours.model.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        full_BTV = ours(_ids(97))
    torch.testing.assert_close(full_BTV[:, :5], ref_BTV[:, :5], atol=1e-5, rtol=0)
    assert (full_BTV[:, 5:] - ref_BTV[:, 5:]).abs().max() > 1e-3


def test_qwen3_qk_norm_head_dim_bias_and_tied_head_match_transformers(tmp_path):
    config = Qwen3Config(
        **SMALL, head_dim=24, tie_word_embeddings=True, attention_bias=True, max_position_embeddings=64
    )
    ref_BTV, out_BTV, ours, _ = _logits_pair(tmp_path, "qwen3", Qwen3ForCausalLM, config)
    attn = ours.model.layers[1].self_attn
    assert attn.q_norm.weight.shape == (24,) and attn.q_proj.bias is not None
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)


def test_family_knob_given_with_d_wins_over_hf_fields(tmp_path):
    config = MistralConfig(**SMALL, sliding_window=5)
    package = _build(tmp_path, "mistral", {"hf_fields": _hf_fields(config), "sliding_window": 9, "hidden_size": 32})
    model = _import_model(package).build_model()
    assert model.model.layers[0].self_attn.sliding_window == 9
    assert model.hidden_size == 32 and model.vocab_size == 97


def test_mistral_without_a_window_and_the_cli_build(tmp_path):
    """`fgc build` of a child of lm/mistral.yaml (smoke check included); `sliding_window: null`
    leaves no window argument in the generated code."""
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        '-- extends "lm/mistral.yaml"\n[config_metadata]\n== super()\n-- set ns.sliding_window = None\n'
        "-- set ns.hidden_size = 32\n-- set ns.data_dir = 'data'\n"
    )
    proc = run_fgc("build", cfg, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    build_model = (tmp_path / "out" / "model.py").read_text().split("def build_model")[1]
    assert "sliding_window=" not in build_model and "num_attention_heads=4" in build_model
    model = _import_model(tmp_path / "out").build_model()
    assert model.model.layers[0].self_attn.sliding_window is None


@pytest.mark.parametrize(
    "family, variables, message",
    [
        ("mistral", {"sliding_window": 0}, "sliding_window must be at least 1, got 0"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "rope scaling factor must be positive"),
        ("llama", {"rope_scaling": {"rope_type": "longrope"}}, "rope_type longrope is not supported"),
        ("llama", {"hf_fields": {"hidden_act": "gelu"}}, "hidden_act gelu is not supported"),
        ("qwen3", {"hf_fields": {"use_sliding_window": True}}, "use_sliding_window is not supported"),
        ("llama", {"init_rules": [["(", 0.1]]}, "init_rules pattern '(' is not a valid regex"),
    ],
)
def test_family_knob_errors_name_the_template_line(family, variables, message):
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES[family].template, variables={"data_dir": "data", **variables})
    [d] = info.value.diagnostics
    assert message in d.message
    assert d.loc.line is not None and d.loc.file.endswith(".yaml")


def test_postnorm_layer_is_a_one_block_override(tmp_path):
    cfg = tmp_path / "postln.yaml"
    cfg.write_text(
        '-- extends "lm/llama.yaml"\n'
        "[config_metadata]\n== super()\n-- set ns.hidden_size = 32\n-- set ns.num_hidden_layers = 1\n"
        "[layer]\n"
        ".layer: &layer !partial:fgc.components.layers:PostNormDecoderLayer@layer_factory\n"
        "    attention_factory: *attention\n    mlp_factory: *mlp\n    norm_factory: *norm\n"
    )
    package = _build(tmp_path, cfg)
    text = (package / "model.py").read_text()
    assert "class PostNormDecoderLayer" in text and "class PreNormDecoderLayer" not in text
    model = _import_model(package).build_model().eval()
    layer = model.model.layers[0]
    assert type(layer).__name__ == "PostNormDecoderLayer"
    assert "model.layers.0.post_feedforward_layernorm.weight" in model.state_dict()
    with torch.no_grad():
        for p in model.parameters():  # norm scales away from 1, so their order shows
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        ids_BT = _ids(257, seq=9)
        # The post-norm order by hand: norm(x + attn(x)), norm(x + mlp(x)), final norm, head.
        x = model.model.embed_tokens(ids_BT)
        ctx = model.layer_context(torch.arange(9)[None].expand(2, 9))
        x = layer.post_attention_layernorm(x + layer.self_attn(x, ctx))
        x = layer.post_feedforward_layernorm(x + layer.mlp(x))
        expected_BTV = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(model(ids_BT), expected_BTV, atol=1e-6, rtol=0)


def test_attention_from_a_user_module_next_to_the_config(tmp_path):
    (tmp_path / "my_attention.py").write_text(
        '''"""A user's attention: no rotary positions (NoPE), otherwise the library's."""
import torch
import torch.nn.functional as F

from fgc.components.attention import CausalSelfAttention
from fgc.components.positions import LayerContext


class NoPEAttention(CausalSelfAttention):
    """Causal attention that ignores the rotary tables."""

    def forward(self, x_BTD, ctx):
        return super().forward(x_BTD, LayerContext(None, ctx.attn_mask_B1TS))
'''
    )
    cfg = tmp_path / "nope.yaml"
    cfg.write_text(
        '-- extends "lm/llama.yaml"\n'
        "[config_metadata]\n== super()\n-- set ns.hidden_size = 32\n-- set ns.num_hidden_layers = 1\n"
        "[attention]\n"
        ".attention: &attention !partial:.my_attention:NoPEAttention@attention_factory\n"
        "    num_attention_heads: {{ ns.num_attention_heads }}\n"
    )
    package = _build(tmp_path, cfg)
    text = (package / "model.py").read_text()
    assert "# ---- vendored from my_attention.py" in text and "fgc.components" not in text
    model = _import_model(package).build_model().eval()
    assert type(model.model.layers[0].self_attn).__name__ == "NoPEAttention"
    # Without positions, one layer's last-token logits do not depend on the order of the tokens before it.
    ids_BT = _ids(257, batch=1, seq=8)
    swapped_BT = ids_BT[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids_BT)[:, -1], model(swapped_BT)[:, -1], atol=1e-5, rtol=0)
