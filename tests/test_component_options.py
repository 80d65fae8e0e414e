"""The component library's options that model families build on: a factory per layer, embedding and
logit scaling, logit soft-capping, attention scale, soft-capped attention scores, q/k/v biases,
partial rotary, offset RMSNorm, gated and plain MLPs. Each is checked against the computation it
stands for, written out here; the families' tests check them against transformers.

Shape legend: B batch, T sequence, D hidden size, H heads, E head dim, V vocabulary size.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fgc.components.attention import CausalSelfAttention
from fgc.components.causal_lm import CausalLM
from fgc.components.layers import PreNormDecoderLayer
from fgc.components.mlp import MLP, GatedMLP, SwiGLUMLP, activate
from fgc.components.norm import RMSNorm
from fgc.components.positions import LayerContext
from fgc.components.rotary import RotaryEmbedding
from fgc_runtime.kernels import apply_rope


def _ctx(head_dim: int, T: int = 7, B: int = 2) -> LayerContext:
    position_ids_BT = torch.arange(T).unsqueeze(0).expand(B, T)
    return LayerContext(RotaryEmbedding(head_dim).tables(position_ids_BT))


def _model(**options) -> CausalLM:
    torch.manual_seed(0)
    layer = functools.partial(
        PreNormDecoderLayer,
        attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4),
        mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=40),
        norm_factory=RMSNorm,
    )
    options.setdefault("layer_factory", layer)
    return CausalLM(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, norm_factory=RMSNorm,
        positions=RotaryEmbedding(8), **options,
    ).eval()


def test_one_factory_per_layer_builds_layers_of_different_kinds():
    full = functools.partial(
        PreNormDecoderLayer,
        attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4),
        mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=40),
        norm_factory=RMSNorm,
    )
    local = functools.partial(full, attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4, sliding_window=3))
    model = _model(layer_factory=[local, full])
    assert [layer.self_attn.sliding_window for layer in model.decoder_layers()] == [3, None]
    with pytest.raises(ValueError, match="3 layer factories for num_hidden_layers 2"):
        _model(layer_factory=[local, full, full])


def test_embedding_multiplier_logits_scaling_and_softcapping():
    ids_BT = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = _model()
    scaled = _model(embedding_multiplier=math.sqrt(32), logits_scaling=4.0, final_logit_softcapping=3.0)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        x_BTD = plain.model.embed_tokens(ids_BT) * torch.tensor(math.sqrt(32))
        position_ids_BT = torch.arange(7).unsqueeze(0).expand(2, 7)
        x_BTD = plain.run_layers(x_BTD, plain.layer_context(position_ids_BT))
        want_BTV = torch.tanh(plain.lm_head(plain.final_hidden(x_BTD)) / 4.0 / 3.0) * 3.0
        torch.testing.assert_close(scaled(ids_BT), want_BTV, rtol=0, atol=0)
    assert plain.output_projection()[0] is plain.lm_head.weight
    assert scaled.output_projection() is None  # the chunked loss cannot compute such a head


def _attention(**options) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(32, 4, 2, **options).eval()


def test_qkv_bias_is_on_q_k_v_only():
    attn = _attention(qkv_bias=True)
    assert [attn.q_proj.bias is not None, attn.k_proj.bias is not None, attn.v_proj.bias is not None] == [True] * 3
    assert attn.o_proj.bias is None
    assert _attention(attention_bias=True).o_proj.bias is not None


def test_scaling_and_soft_capped_scores_match_the_written_out_attention():
    x_BTD = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    ctx = _ctx(8)
    for options in ({"scaling": 0.3}, {"scaling": 0.3, "attn_logit_softcapping": 2.0}):
        attn = _attention(**options)
        with torch.no_grad():
            q_BHTE = attn.q_proj(x_BTD).view(2, 7, 4, 8).transpose(1, 2)
            k_BHTE = attn.k_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            v_BHTE = attn.v_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            q_BHTE, k_BHTE = apply_rope(q_BHTE, k_BHTE, *ctx.rotary_tables)
            scores_BHTS = q_BHTE @ k_BHTE.transpose(2, 3) * 0.3
            if "attn_logit_softcapping" in options:
                scores_BHTS = torch.tanh(scores_BHTS / 2.0) * 2.0
            scores_BHTS = scores_BHTS.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -math.inf)
            y_BTD = (scores_BHTS.softmax(-1) @ v_BHTE).transpose(1, 2).reshape(2, 7, 32)
            torch.testing.assert_close(attn(x_BTD, ctx), attn.o_proj(y_BTD), rtol=1e-5, atol=1e-6)


def test_partial_rotary_rotates_the_first_channels_only():
    attn = _attention(rotary_dim=4)
    x_BTD = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    ctx = _ctx(4)
    with torch.no_grad():
        q_BHTE = attn.q_proj(x_BTD).view(2, 7, 4, 8).transpose(1, 2)
        k_BKTE = attn.k_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2)
        v_BKTE = attn.v_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2)
        q_rot, k_rot = apply_rope(q_BHTE[..., :4], k_BKTE[..., :4], *ctx.rotary_tables)
        q_BHTE = torch.cat((q_rot, q_BHTE[..., 4:]), -1)
        k_BKTE = torch.cat((k_rot, k_BKTE[..., 4:]), -1)
        y_BHTE = torch.nn.functional.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, is_causal=True, enable_gqa=True)
        want_BTD = attn.o_proj(y_BHTE.transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(attn(x_BTD, ctx), want_BTD, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        _attention(rotary_dim=3)


def test_offset_rms_norm_scales_by_one_plus_its_weight():
    norm = RMSNorm(16, eps=1e-6, offset=1.0)
    assert torch.equal(norm.weight, torch.zeros(16))  # the scale starts at 1
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
        x = torch.randn(3, 16)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm.weight)
        torch.testing.assert_close(norm(x), want)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.zeros(16))


@pytest.mark.parametrize("name, reference", [
    ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    ("gelu_tanh", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    ("silu", lambda x: x * torch.sigmoid(x)),
    ("relu", lambda x: x.clamp(min=0)),
])
def test_activations(name, reference):
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(activate(name, x), reference(x), rtol=1e-5, atol=1e-6)


def test_gated_and_plain_mlps():
    torch.manual_seed(0)
    x_BTD = torch.randn(2, 5, 16)
    gated = GatedMLP(16, 24, activation="gelu_tanh")
    with torch.no_grad():
        want = gated.down_proj(activate("gelu_tanh", gated.gate_proj(x_BTD)) * gated.up_proj(x_BTD))
        torch.testing.assert_close(gated(x_BTD), want, rtol=0, atol=0)
        plain = MLP(16, 64, activation="gelu")
        torch.testing.assert_close(plain(x_BTD), plain.down_proj(activate("gelu", plain.up_proj(x_BTD))), rtol=0, atol=0)
    assert plain.up_proj.bias is not None and GatedMLP.tp_plan["down_proj"] == "rowwise"
    with pytest.raises(ValueError, match="unknown activation"):
        activate("swish2", x_BTD)
