"""fgc.components against transformers' Llama: same state-dict keys, same logits, sane factories.

Shape legend: B batch, T sequence, V vocabulary size.
"""

import ast
import functools
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fgc.components.attention import CausalSelfAttention
from fgc.components.causal_lm import CausalLM
from fgc.components.layers import PreNormDecoderLayer
from fgc.components.mlp import SwiGLUMLP
from fgc.components.norm import RMSNorm
from fgc.components.rotary import RotaryEmbedding

COMPONENTS_DIR = Path(__file__).resolve().parents[1] / "fgc" / "components"
COMPONENT_FILES = ["norm.py", "rotary.py", "attention.py", "mlp.py", "layers.py", "causal_lm.py"]

# What a component module may import, because the copier inlines these files into model.py.
ALLOWED_STDLIB = {"math", "functools", "typing", "dataclasses"}
ALLOWED_PLAIN_IMPORTS = ALLOWED_STDLIB | {"torch"}
ALLOWED_FROM_IMPORTS = {
    ("torch", "nn"),
    ("fgc_runtime.kernels", "rms_norm"),
    ("fgc_runtime.kernels", "swiglu"),
    ("fgc_runtime.kernels", "apply_rope"),
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
        rotary_embedding=rotary,
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
    shared = ours.model.rotary_emb
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
        rotary_embedding=RotaryEmbedding(32),
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
        ours.model.rotary_emb.reset_parameters()
        out_BTV = ours(ids_BT)
    assert out_BTV.dtype == torch.bfloat16
    torch.testing.assert_close(out_BTV.float(), ref_BTV, atol=0.05, rtol=0.05)


def _component_trees() -> dict[str, ast.Module]:
    return {name: ast.parse((COMPONENTS_DIR / name).read_text(), filename=name) for name in COMPONENT_FILES}


def test_component_imports_are_in_the_allowed_set():
    component_modules = {f"fgc.components.{Path(n).stem}" for n in COMPONENT_FILES}
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
