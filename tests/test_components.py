"""fgc.components against transformers: same state-dict keys, same logits, same rotary tables for
each rope type, sane factories; packed-document and sliding-window masks; init rules.

Shape legend: B batch, T sequence, V vocabulary size.
"""

import ast
import functools
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fgc.components.attention import CausalSelfAttention, sliding_window_causal_mask
from fgc.components.causal_lm import CausalLM, packed_document_positions_and_mask
from fgc.components.layers import PostNormDecoderLayer, PreNormDecoderLayer
from fgc.components.mlp import SwiGLUMLP
from fgc.components.norm import RMSNorm
from fgc.components.positions import LayerContext
from fgc.components.rotary import (
    DynamicNTKRotaryEmbedding,
    Llama3RotaryEmbedding,
    LinearScalingRotaryEmbedding,
    RotaryEmbedding,
    YarnRotaryEmbedding,
)

COMPONENTS_DIR = Path(__file__).resolve().parents[1] / "fgc" / "components"
COMPONENT_FILES = ["positions.py", "norm.py", "rotary.py", "attention.py", "mlp.py", "layers.py", "causal_lm.py", "moe.py"]

# What a component module may import, because the copier inlines these files into model.py.
ALLOWED_STDLIB = {"math", "functools", "re", "typing", "dataclasses", "zlib"}
ALLOWED_PLAIN_IMPORTS = ALLOWED_STDLIB | {"torch"}
ALLOWED_FROM_IMPORTS = {
    ("torch", "nn"),
    ("fgc_runtime.kernels", "rms_norm"),
    ("fgc_runtime.kernels", "swiglu"),
    ("fgc_runtime.kernels", "apply_rope"),
    ("fgc_runtime.kernels", "scaled_dot_product_attention"),
    ("torch.distributed.tensor", "distribute_tensor"),  # CausalLM.init_weights, for DTensor shards
}


def _llama_config(tie: bool = False, head_dim: int | None = None) -> LlamaConfig:
    extra = {} if head_dim is None else {"head_dim": head_dim}
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=112,
        rope_theta=10000.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attention_bias=False,
        # Eager attention: an independent reference for our SDPA path.
        attn_implementation="eager",
        **extra,
    )


def _build_ours(cfg: LlamaConfig) -> CausalLM:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps)
    attention = functools.partial(
        CausalSelfAttention,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        attention_bias=cfg.attention_bias,
    )
    mlp = functools.partial(SwiGLUMLP, intermediate_size=cfg.intermediate_size, mlp_bias=cfg.mlp_bias)
    layer = functools.partial(PreNormDecoderLayer, attention_factory=attention, mlp_factory=mlp, norm_factory=norm)
    rotary = RotaryEmbedding(head_dim, cfg.max_position_embeddings, cfg.rope_parameters["rope_theta"])
    return CausalLM(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        layer_factory=layer,
        norm_factory=norm,
        positions=rotary,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
    )


def _pair(cfg: LlamaConfig) -> tuple[LlamaForCausalLM, CausalLM]:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    ours = _build_ours(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize(
    "tie, head_dim",
    [(False, None), (True, None), (False, 32)],
    ids=["untied", "tied", "head_dim32"],
)
def test_logits_match_transformers_llama(tie, head_dim):
    cfg = _llama_config(tie=tie, head_dim=head_dim)
    hf, ours = _pair(cfg)
    assert set(ours.state_dict()) == set(hf.state_dict())
    if head_dim is not None:
        assert ours.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
        assert ours.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 64)
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids_BT = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        out_BTV = ours(ids_BT)
    assert out_BTV.shape == (2, 37, 97)
    assert out_BTV.dtype == torch.float32
    # Guard against a vacuous comparison of near-zero logits.
    assert ref_BTV.abs().max() > 1e-2
    torch.testing.assert_close(out_BTV, ref_BTV, atol=1e-5, rtol=0)


def test_state_dict_has_no_buffers_and_llama_key_names():
    ours = _build_ours(_llama_config())
    keys = set(ours.state_dict())
    assert "model.embed_tokens.weight" in keys
    assert "model.layers.2.self_attn.o_proj.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys
    assert "model.layers.1.post_attention_layernorm.weight" in keys
    assert "model.norm.weight" in keys and "lm_head.weight" in keys
    assert not any("inv_freq" in k for k in keys)
    assert len(keys) == 3 + 3 * 9


def test_rotary_matches_transformers():
    cfg = _llama_config()
    ref = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, 128, 10000.0)
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, atol=0, rtol=0)
    position_ids_BT = torch.arange(50).unsqueeze(0).expand(2, 50)
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = ref(x, position_ids_BT)
    cos_BTE, sin_BTE = ours(position_ids_BT)
    assert cos_BTE.shape == (2, 50, 16) and cos_BTE.dtype == torch.float32
    torch.testing.assert_close(cos_BTE, ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin_BTE, ref_sin, atol=0, rtol=0)
    # Position 0 is the identity rotation.
    assert torch.equal(cos_BTE[:, 0], torch.ones(2, 16)) and torch.equal(sin_BTE[:, 0], torch.zeros(2, 16))


def test_rotary_reset_parameters_restores_fp32_buffer():
    rotary = RotaryEmbedding(32, rope_theta=500000.0)
    expected = rotary.inv_freq.clone()
    rotary.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.bfloat16
    rotary.reset_parameters()
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, expected)
    assert "inv_freq" not in rotary.state_dict()


def test_factories_make_fresh_layers_and_share_rotary():
    ours = _build_ours(_llama_config())
    layer0, layer1 = ours.model.layers[0], ours.model.layers[1]
    assert layer0 is not layer1
    assert layer0.self_attn.q_proj.weight is not layer1.self_attn.q_proj.weight
    assert layer0.input_layernorm is not layer0.post_attention_layernorm
    ids0 = {id(p) for p in layer0.parameters()}
    ids1 = {id(p) for p in layer1.parameters()}
    assert ids0.isdisjoint(ids1)
    # Fresh modules get fresh random weights, not copies.
    assert not torch.equal(layer0.mlp.up_proj.weight, layer1.mlp.up_proj.weight)
    shared = ours.model.positions
    assert isinstance(shared, RotaryEmbedding)
    assert sum(1 for m in ours.modules() if isinstance(m, RotaryEmbedding)) == 1


def test_init_weights_like_llama():
    torch.manual_seed(0)
    ours = CausalLM(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        layer_factory=functools.partial(
            PreNormDecoderLayer,
            attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4, attention_bias=True),
            mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=256),
            norm_factory=RMSNorm,
        ),
        norm_factory=RMSNorm,
        positions=RotaryEmbedding(32),
        initializer_range=0.05,
    )
    assert (ours.vocab_size, ours.hidden_size, ours.num_hidden_layers) == (512, 128, 2)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    for w in [ours.model.embed_tokens.weight, ours.lm_head.weight, ours.model.layers[0].self_attn.q_proj.weight]:
        assert abs(w.std().item() - 0.05) < 0.005
        assert abs(w.mean().item()) < 0.005
    assert torch.equal(ours.model.layers[1].self_attn.k_proj.bias, torch.zeros(128))
    assert torch.equal(ours.model.norm.weight, torch.ones(128))
    assert torch.equal(ours.model.layers[0].input_layernorm.weight, torch.ones(128))


def test_attention_validates_head_counts():
    with pytest.raises(ValueError, match="must divide hidden_size"):
        CausalSelfAttention(hidden_size=64, num_attention_heads=5)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        CausalSelfAttention(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    # An explicit head_dim lifts the divisibility requirement, as in transformers.
    attn = CausalSelfAttention(hidden_size=64, num_attention_heads=5, num_key_value_heads=1, head_dim=24)
    assert attn.q_proj.weight.shape == (120, 64) and attn.v_proj.weight.shape == (24, 64)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(15)


def test_backward_reaches_every_parameter():
    for tie in (False, True):
        ours = _build_ours(_llama_config(tie=tie, head_dim=32)).train()
        ids_BT = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(2))
        logits_BTV = ours(ids_BT)
        loss = torch.nn.functional.cross_entropy(logits_BTV[:, :-1].reshape(-1, 97), ids_BT[:, 1:].reshape(-1))
        loss.backward()
        # Uniform-ish logits at init: loss near ln(97).
        assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
        for name, p in ours.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_bf16_forward_keeps_model_dtype():
    ours = _build_ours(_llama_config()).eval()
    ids_BT = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_BTV = ours(ids_BT)
        ours.to(torch.bfloat16)
        ours.model.positions.reset_parameters()
        out_BTV = ours(ids_BT)
    assert out_BTV.dtype == torch.bfloat16
    torch.testing.assert_close(out_BTV.float(), ref_BTV, atol=0.05, rtol=0.05)


ROPE_VARIANTS = {
    "linear": (LinearScalingRotaryEmbedding, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (DynamicNTKRotaryEmbedding, {"rope_type": "dynamic", "factor": 3.0}),
    "yarn": (YarnRotaryEmbedding, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    "yarn_mscale": (
        YarnRotaryEmbedding,
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
    ),
    "yarn_attention_factor": (
        YarnRotaryEmbedding,
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "attention_factor": 0.8},
    ),
    "llama3": (
        Llama3RotaryEmbedding,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rotary_scaling_variants_match_transformers_tables(variant):
    cls, rope_scaling = ROPE_VARIANTS[variant]
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=32,
        rope_theta=1000.0,
        rope_scaling=dict(rope_scaling),
    )
    kwargs = {k: v for k, v in rope_scaling.items() if k != "rope_type"}
    ours = cls(16, max_position_embeddings=32, rope_theta=1000.0, **kwargs)
    x = torch.zeros(1, dtype=torch.float32)
    # positions beyond max_position_embeddings (32) too, where dynamic NTK changes its base
    for length in (20, 50):
        ref = LlamaRotaryEmbedding(cfg)  # fresh: transformers' dynamic variant keeps state
        position_ids_BT = torch.arange(length).unsqueeze(0).expand(2, length)
        ref_cos, ref_sin = ref(x, position_ids_BT)
        cos_BTE, sin_BTE = ours(position_ids_BT)
        torch.testing.assert_close(cos_BTE, ref_cos, atol=1e-7, rtol=0)
        torch.testing.assert_close(sin_BTE, ref_sin, atol=1e-7, rtol=0)
    # the variant really differs from the default RoPE
    plain_cos, _ = RotaryEmbedding(16, 32, 1000.0)(position_ids_BT)
    assert (plain_cos - cos_BTE).abs().max() > 1e-2
    if variant != "dynamic":
        torch.testing.assert_close(ours.inv_freq, LlamaRotaryEmbedding(cfg).inv_freq, atol=0, rtol=0)


def test_scaled_rotary_reset_parameters_keeps_the_scaling():
    rotary = Llama3RotaryEmbedding(32, 64, 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    expected = rotary.inv_freq.clone()
    assert not torch.equal(expected, RotaryEmbedding(32, 64, 500000.0).inv_freq)
    rotary.to(torch.bfloat16)
    rotary.reset_parameters()
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, expected)
    with pytest.raises(ValueError, match="high_freq_factor"):
        Llama3RotaryEmbedding(32, factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="factor must be positive"):
        LinearScalingRotaryEmbedding(32, factor=0.0)


def test_packed_document_positions_and_mask():
    doc_BT = torch.tensor([[5, 5, 5, 2, 2, 7], [1, 1, 2, 1, 1, 1]])
    position_ids_BT, mask_B1TS = packed_document_positions_and_mask(doc_BT)
    # a document is a run of equal ids: the second row's last three tokens are a new document
    assert position_ids_BT.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 1, 2]]
    assert mask_B1TS.shape == (2, 1, 6, 6) and mask_B1TS.dtype == torch.bool
    assert mask_B1TS[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask_B1TS[1, 0, 5].int().tolist() == [0, 0, 0, 1, 1, 1]


def test_sliding_window_mask_convention():
    # a token sees itself and the sliding_window - 1 tokens before it (transformers' Mistral)
    assert sliding_window_causal_mask(5, 2).int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def _random_model(window=None, qk_norm=False, layer_class=PreNormDecoderLayer) -> CausalLM:
    torch.manual_seed(0)
    norm = functools.partial(RMSNorm, eps=1e-6)
    attention = functools.partial(
        CausalSelfAttention,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        qk_norm_factory=norm if qk_norm else None,
    )
    mlp = functools.partial(SwiGLUMLP, intermediate_size=96)
    layer = functools.partial(layer_class, attention_factory=attention, mlp_factory=mlp, norm_factory=norm)
    model = CausalLM(97, 64, 2, layer, norm, RotaryEmbedding(16), initializer_range=0.1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    return model


@pytest.mark.parametrize(
    "window, qk_norm", [(None, False), (4, False), (None, True)], ids=["plain", "window4", "qknorm"]
)
def test_packed_documents_give_the_logits_of_each_document_alone(window, qk_norm):
    model = _random_model(window=window, qk_norm=qk_norm)
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 12, 3]
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    packed_BT = torch.cat(docs, dim=1)
    document_ids_BT = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed_BTV = model(packed_BT, document_ids_BT)
        alone_BTV = torch.cat([model(doc) for doc in docs], dim=1)
        unmasked_BTV = model(packed_BT)
        one_document_BTV = model(packed_BT, torch.zeros_like(packed_BT))
    torch.testing.assert_close(packed_BTV, alone_BTV, atol=1e-5, rtol=0)
    # the mask matters: without it the second and third documents see the first
    assert (unmasked_BTV[:, 7:] - alone_BTV[:, 7:]).abs().max() > 1e-3
    # one document spanning the row is the plain causal path
    torch.testing.assert_close(one_document_BTV, unmasked_BTV, atol=1e-5, rtol=0)


def test_sliding_window_of_one_attends_only_to_itself():
    attn = CausalSelfAttention(hidden_size=32, num_attention_heads=2, sliding_window=1)
    x_BTD = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(6))
    ctx = LayerContext(RotaryEmbedding(16).tables(torch.arange(6).unsqueeze(0).expand(2, 6)))
    with torch.no_grad():
        out_BTD = attn(x_BTD, ctx)
        # softmax over one key is 1: the output is o_proj(v_proj(x)) token by token
        torch.testing.assert_close(out_BTD, attn.o_proj(attn.v_proj(x_BTD)), atol=1e-6, rtol=0)
        attn.sliding_window = 6  # a window as long as the input is plain causal attention
        wide_BTD = attn(x_BTD, ctx)
        attn.sliding_window = None
        torch.testing.assert_close(wide_BTD, attn(x_BTD, ctx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="sliding_window"):
        CausalSelfAttention(hidden_size=32, num_attention_heads=2, sliding_window=0)


def test_init_rules_first_matching_rule_wins():
    norm = RMSNorm
    layer = functools.partial(
        PreNormDecoderLayer,
        attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4),
        mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=256),
        norm_factory=norm,
    )
    torch.manual_seed(0)
    model = CausalLM(
        512,
        128,
        2,
        layer,
        norm,
        RotaryEmbedding(32),
        init_rules=(
            (r"layers\.0\.self_attn\.q_proj", "zeros"),
            (r"q_proj", "ones"),
            (r"o_proj|down_proj", 0.002),
            (r"layernorm", 0.0),
        ),
    )
    layers = model.model.layers
    assert torch.equal(layers[0].self_attn.q_proj.weight, torch.zeros(128, 128))
    assert torch.equal(layers[1].self_attn.q_proj.weight, torch.ones(128, 128))
    for w in [layers[0].self_attn.o_proj.weight, layers[1].mlp.down_proj.weight]:
        assert abs(w.std().item() - 0.002) < 0.0003
    assert torch.equal(layers[0].input_layernorm.weight, torch.zeros(128))
    # unmatched parameters keep Llama's initialisation
    assert abs(layers[0].self_attn.k_proj.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(128))
    with pytest.raises(ValueError, match="not a valid regex"):
        CausalLM(8, 32, 1, layer, norm, RotaryEmbedding(8), init_rules=(("(", 0.1),))
    with pytest.raises(ValueError, match="standard deviation"):
        CausalLM(8, 32, 1, layer, norm, RotaryEmbedding(8), init_rules=(("q_proj", "normal"),))


def test_backward_reaches_every_parameter_of_postnorm_qknorm_window_models():
    model = _random_model(window=3, qk_norm=True, layer_class=PostNormDecoderLayer).train()
    ids_BT = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7))
    documents_BT = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    logits_BTV = model(ids_BT, documents_BT)
    torch.nn.functional.cross_entropy(logits_BTV.reshape(-1, 97), ids_BT.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"} <= set(
        model.state_dict()
    )


def _component_trees() -> dict[str, ast.Module]:
    """Every module fgc vendors into model.py: the component library's and each family's parts."""
    paths = {name: COMPONENTS_DIR / name for name in COMPONENT_FILES}
    for path in sorted((COMPONENTS_DIR.parent / "families").glob("*/parts.py")):
        paths[f"families/{path.parent.name}/parts.py"] = path
    return {name: ast.parse(path.read_text(), filename=name) for name, path in paths.items()}


def test_component_imports_are_in_the_allowed_set():
    component_modules = {f"fgc.components.{Path(n).stem}" for n in COMPONENT_FILES}
    component_modules |= {f"fgc.families.{p.parent.name}.parts" for p in (COMPONENTS_DIR.parent / "families").glob("*/parts.py")}
    for name, tree in _component_trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    allowed = alias.name in ALLOWED_PLAIN_IMPORTS or (
                        alias.name == "torch.nn.functional" and alias.asname == "F"
                    )
                    assert allowed, f"{name}: import {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                for alias in node.names:
                    allowed = (
                        node.module in ALLOWED_STDLIB
                        or (node.module, alias.name) in ALLOWED_FROM_IMPORTS
                        or node.module in component_modules
                    )
                    assert allowed, f"{name}: from {node.module} import {alias.name}"
                    assert alias.name != "*", f"{name}: star import"


def test_component_modules_are_mergeable():
    """Top-level names are unique across modules and module level holds no side effects."""
    seen: dict[str, str] = {}
    for name, tree in _component_trees().items():
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # module docstring
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                defined = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                assert isinstance(node.value, ast.Constant), f"{name}: non-constant module-level value"
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets]
            else:
                raise AssertionError(f"{name}: unexpected module-level {type(node).__name__}")
            for top in defined:
                assert top not in seen, f"{top} defined in both {seen[top]} and {name}"
                seen[top] = name
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                assert ast.get_docstring(node), f"{name}: {node.name} has no docstring"
    init_tree = ast.parse((COMPONENTS_DIR / "__init__.py").read_text())
    assert len(init_tree.body) == 1 and ast.get_docstring(init_tree)
