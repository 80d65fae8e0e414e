"""The model protocol: positions as a pluggable part, the layer context, the methods a model
answers (decoder layers, pipeline stage modules, FLOPs, the loss's head), what its parts declare
(tensor-parallel plan, divisibility, kernels), and the one-line errors of a model that lacks a
method a step needs.

Shape legend: B batch, T sequence, D hidden size, V vocabulary size.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import line_of, run_fgc, small_config
from fgc.components.attention import CausalSelfAttention
from fgc.components.causal_lm import CausalLM
from fgc.components.layers import PreNormDecoderLayer
from fgc.components.mlp import SwiGLUMLP
from fgc.components.norm import RMSNorm
from fgc.components.positions import LayerContext, LearnedPositionalEmbedding, NoPositions
from fgc.components.rotary import RotaryEmbedding
from fgc_runtime.errors import RunError

V, D = 61, 32


def _model(positions: nn.Module, layers: int = 3, use_rope: bool = True, tie: bool = False, noise: bool = True) -> CausalLM:
    torch.manual_seed(0)
    attention = functools.partial(CausalSelfAttention, num_attention_heads=4, num_key_value_heads=2, use_rope=use_rope)
    layer = functools.partial(
        PreNormDecoderLayer,
        attention_factory=attention,
        mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=48),
        norm_factory=RMSNorm,
    )
    model = CausalLM(V, D, layers, layer, RMSNorm, positions, tie_word_embeddings=tie, initializer_range=0.1).eval()
    with torch.no_grad():  # norm scales away from 1
        for p in model.parameters() if noise else ():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


def _ids(batch: int = 2, seq: int = 9, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _positions(ids_BT: torch.Tensor) -> torch.Tensor:
    B, T = ids_BT.shape
    return torch.arange(T).unsqueeze(0).expand(B, T)


# -- positions ------------------------------------------------------------------------------------


def test_learned_positions_add_their_vectors_and_have_no_tables():
    model = _model(LearnedPositionalEmbedding(16, D))
    ids_BT = _ids()
    pos_BT = _positions(ids_BT)
    wpe = model.model.positions.weight
    assert wpe.shape == (16, D) and "model.positions.weight" in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(
            model.embed(ids_BT, pos_BT), model.model.embed_tokens(ids_BT) + wpe[pos_BT], atol=0, rtol=0
        )
    assert model.layer_context(pos_BT).rotary_tables is None
    # initialised like the token embedding: normal with initializer_range (0.1) as its std
    fresh = _model(LearnedPositionalEmbedding(512, D), noise=False).model.positions.weight
    assert abs(fresh.std().item() - 0.1) < 0.005 and abs(fresh.mean().item()) < 0.005


def test_learned_positions_restart_at_each_packed_document():
    model = _model(LearnedPositionalEmbedding(16, D))
    docs = [_ids(1, n, seed=n) for n in (5, 7)]
    packed_BT = torch.cat(docs, dim=1)
    document_ids_BT = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        alone_BTV = torch.cat([model(doc) for doc in docs], dim=1)
        torch.testing.assert_close(model(packed_BT, document_ids_BT), alone_BTV, atol=1e-5, rtol=0)
        # the positions matter: without the mask the second document sits at positions 5..11
        assert (model(packed_BT)[:, 5:] - alone_BTV[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["none", "use_rope_false"])
def test_without_positions_the_last_token_does_not_see_the_order(kind):
    # one layer: the last token attends to the embeddings of a set of tokens, in whatever order
    model = _model(NoPositions(), layers=1) if kind == "none" else _model(RotaryEmbedding(8), layers=1, use_rope=False)
    ids_BT = _ids(1, 8)
    swapped_BT = ids_BT[:, [1, 0, 3, 2, 5, 4, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids_BT)[:, -1], model(swapped_BT)[:, -1], atol=1e-5, rtol=0)
        rotary = _model(RotaryEmbedding(8), layers=1)
        assert (rotary(ids_BT)[:, -1] - rotary(swapped_BT)[:, -1]).abs().max() > 1e-4
    if kind == "none":
        assert model.layer_context(_positions(ids_BT)).rotary_tables is None
    else:  # the tables are there; the attention ignores them
        assert model.layer_context(_positions(ids_BT)).rotary_tables is not None
        assert "use_rope=False" in repr(model.decoder_layers()[0].self_attn)


def test_attention_with_the_context_is_the_rotary_attention_bit_for_bit():
    """ctx.rotate is apply_rope over the fp32 tables cast to q's dtype, as the attention did; the
    attention is the runtime's SDPA (bf16 on the CPU: fp32 attention, cast back)."""
    from fgc_runtime.kernels import apply_rope, scaled_dot_product_attention

    attn = CausalSelfAttention(hidden_size=D, num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    x_BTD = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    cos_BTE, sin_BTE = RotaryEmbedding(8).tables(torch.arange(7).unsqueeze(0).expand(2, 7))
    with torch.no_grad():
        got_BTD = attn(x_BTD, LayerContext((cos_BTE, sin_BTE)))
        q = attn.q_proj(x_BTD).view(2, 7, 4, 8).transpose(1, 2)
        k = attn.k_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2)
        v = attn.v_proj(x_BTD).view(2, 7, 2, 8).transpose(1, 2)
        q, k = apply_rope(q, k, cos_BTE.to(q.dtype), sin_BTE.to(q.dtype))
        y = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        expected_BTD = attn.o_proj(y.transpose(1, 2).reshape(2, 7, -1))
    assert got_BTD.dtype == torch.bfloat16 and torch.equal(got_BTD, expected_BTD)


# -- the model's methods --------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [RotaryEmbedding(8), LearnedPositionalEmbedding(16, D), NoPositions()], ids=type)
def test_the_forward_is_its_pieces_and_a_slice_of_layers_composes(positions):
    model = _model(positions)
    ids_BT = _ids()
    pos_BT = _positions(ids_BT)
    with torch.no_grad():
        ctx = model.layer_context(pos_BT)
        x_BTD = model.embed(ids_BT, pos_BT)
        whole_BTV = model.head(model.final_hidden(model.run_layers(x_BTD, ctx)))
        split_BTD = model.run_layers(model.run_layers(x_BTD, ctx, [0]), ctx, range(1, 3))
        assert torch.equal(model(ids_BT), whole_BTV)
        assert torch.equal(model.head(model.final_hidden(split_BTD)), whole_BTV)
        assert torch.equal(model.hidden_states(ids_BT), model.final_hidden(model.run_layers(x_BTD, ctx)))
    assert model.decoder_layers() is model.model.layers
    weight, bias = model.output_projection()
    assert weight is model.lm_head.weight and bias is None


def test_stage_modules_name_every_parameter_once_under_its_full_name():
    for positions, every_stage in ((RotaryEmbedding(8), True), (LearnedPositionalEmbedding(16, D), False)):
        model = _model(positions)
        first, middle, last = model.stage_modules(True, False), model.stage_modules(False, False), model.stage_modules(False, True)
        assert list(first) == ["model.embed_tokens", "model.positions"]
        assert list(last) == (["model.positions"] if every_stage else []) + ["model.norm", "lm_head"]
        assert list(middle) == (["model.positions"] if every_stage else [])
        names = {f"{prefix}.{n}" for prefix, m in {**first, **last}.items() for n, _ in m.named_parameters()}
        names |= {f"model.layers.{i}.{n}" for i, layer in enumerate(model.decoder_layers()) for n, _ in layer.named_parameters()}
        assert names == {n for n, _ in model.named_parameters()}


def test_a_stage_module_runs_its_slice_with_the_whole_models_names():
    from fgc_runtime.pipeline import StageModule

    model = _model(LearnedPositionalEmbedding(16, D))
    first = StageModule(model, [0, 1], first=True, last=False)
    last = StageModule(model, [2], first=False, last=True)
    ids_BT = _ids()
    with torch.no_grad():
        assert torch.equal(last(first(ids_BT)), model(ids_BT))
    assert {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()} == {
        n for n, _ in model.named_parameters()
    }
    assert "model.positions.weight" in dict(first.named_parameters())
    assert not any(n.startswith("model.positions") for n, _ in last.named_parameters())


def test_flops_per_token_counts_the_matmul_parameters():
    from fgc_runtime.train import MFU

    for positions in (RotaryEmbedding(8), LearnedPositionalEmbedding(16, D)):
        for tie in (False, True):
            model = _model(positions, tie=tie)
            total = sum(p.numel() for p in model.parameters())
            lookups = V * D + sum(p.numel() for p in model.model.positions.parameters())
            n = total - lookups + (V * D if tie else 0)
            value, formula = model.flops_per_token(16)
            assert value == 6 * n + 12 * 3 * D * 16
            assert formula.startswith(f"6*N + 12*L*H*T = 6*{n:,} + 12*3*{D}*16 = {int(value):,}")
            meter = MFU(model, 16, "fp32", torch.device("cpu"))
            assert meter.flops_per_token == value
            assert meter.describe().startswith(f"FLOPs/token = {formula}; ")


def test_lm_head_loss_asks_the_model_for_its_hidden_states_and_head():
    from fgc_runtime.kernels.cross_entropy import LMHeadLoss

    class Wrapped(nn.Module):
        """A model of its own shape (no `.model`, no `lm_head`) that answers the loss's methods."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def hidden_states(self, input_ids_BT):
            return self.inner.hidden_states(input_ids_BT)

        def output_projection(self):
            return self.inner.output_projection()

    model = _model(RotaryEmbedding(8))
    ids_BT, labels_BT = _ids(), _ids(seed=5)
    loss_sum, count = LMHeadLoss(Wrapped(model), impl="chunked", chunk_size=5)(ids_BT, labels_BT)
    expected = F.cross_entropy(model(ids_BT).reshape(-1, V), labels_BT.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_sum, expected, atol=1e-4, rtol=1e-5)
    assert count == ids_BT.numel()
    with pytest.raises(TypeError, match=r"no hidden_states\(\) and no output_projection\(\)"):
        LMHeadLoss(nn.Linear(2, 2))


# -- what the parts declare -----------------------------------------------------------------------


def test_parts_declare_their_tensor_parallel_plan_and_kernels():
    from fgc_runtime.parallel import layer_tp_plan

    layer = _model(RotaryEmbedding(8)).decoder_layers()[0]
    assert layer_tp_plan(layer) == {
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    }
    assert CausalSelfAttention.tp_divisible == ("num_attention_heads", "num_key_value_heads")
    assert SwiGLUMLP.tp_divisible == ("intermediate_size",)
    assert (RMSNorm.kernels, SwiGLUMLP.kernels, CausalSelfAttention.kernels) == (
        ("rms_norm",),
        ("swiglu",),
        ("apply_rope",),
    )


def test_per_layer_settings_ask_the_model_for_its_layers():
    from fgc_runtime.parallel import apply_activation_checkpointing, apply_compile, decoder_layers

    class Named(nn.Module):
        """Its layers sit in a ModuleList named `layers`, but it does not say so."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    for apply in (decoder_layers, apply_activation_checkpointing, apply_compile):
        with pytest.raises(RunError, match=r"the model \(Named\) has no decoder_layers\(\) method"):
            apply(Named())
    model = _model(RotaryEmbedding(8))
    assert apply_activation_checkpointing(model, every_n_layers=2) == 2


def test_a_model_without_the_pipeline_methods_is_a_run_error():
    from fgc_runtime.pipeline import StageModule

    with pytest.raises(RunError, match=r"cannot be pipelined: it has no decoder_layers\(\), stage_modules\(\)"):
        StageModule(nn.Linear(2, 2), [0], first=True, last=True)


# -- the template and the build-time checks ------------------------------------------------------

PLAIN_LM = '''
import torch
from torch import nn


class PlainLM(nn.Module):
    """A language model of the user's own: an embedding and a head, none of the protocol."""

    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.num_hidden_layers, self.hidden_size, self.vocab_size = 1, hidden_size, vocab_size
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([nn.Linear(hidden_size, hidden_size)])
        self.out = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids):
        return self.out(self.layers[0](self.embed(input_ids)))
'''

PLAIN_MODEL_BLOCK = (
    "[model]\n"
    "model: !singleton:.plain_lm:PlainLM@model\n"
    "    vocab_size: 257\n"
    "    hidden_size: 32\n"
)


@pytest.mark.parametrize(
    "meta, message",
    [
        (
            '-- set ns.trainer_type = "pipeline"\n',
            "the model (PlainLM) cannot be pipelined: it has no decoder_layers(), stage_modules(), embed(), "
            "layer_context(), run_layers(), final_hidden(), head()",
        ),
        (
            '-- set ns.trainer_type = "fsdp2"\n-- set ns.nproc = 4\n-- set ns.tensor_degree = 2\n',
            "tensor parallelism needs the model's decoder_layers(): PlainLM has no such method",
        ),
    ],
)
def test_a_users_model_without_a_method_a_step_needs_is_an_error_at_its_line(tmp_path, meta, message):
    (tmp_path / "plain_lm.py").write_text(PLAIN_LM)
    path = small_config(tmp_path, meta, extra=PLAIN_MODEL_BLOCK)
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cfg.yaml:{line_of(path, 'PlainLM@model')}: error: {message}" in proc.stderr


def test_the_chunked_loss_needs_the_models_hidden_states_and_head(tmp_path):
    (tmp_path / "plain_lm.py").write_text(PLAIN_LM)
    path = small_config(tmp_path, '-- set ns.trainer_type = "basic"\n-- set ns.loss_impl = "chunked"\n', extra=PLAIN_MODEL_BLOCK)
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert (
        "error: the chunked loss needs a model with hidden_states() and output_projection() (the component "
        "library's CausalLM has them); this model has no hidden_states() and no output_projection()"
    ) in proc.stderr


def test_learned_positions_are_one_block_override_and_the_old_keyword_is_refused(tmp_path):
    learned = (
        "[positions]\n"
        ".positions: &positions !singleton:fgc.components.positions:LearnedPositionalEmbedding@positions\n"
        "    max_position_embeddings: {{ ns.seq_len }}\n"
        "    hidden_size: {{ ns.hidden_size }}\n"
    )
    path = small_config(tmp_path, '-- set ns.trainer_type = "pipeline"\n-- set ns.num_hidden_layers = 4\n', extra=learned)
    out = tmp_path / "build"
    run_fgc("build", path, "-o", out, check=True)
    assert "class LearnedPositionalEmbedding(nn.Embedding):" in (out / "model.py").read_text()
    stages = json.loads((out / "manifest.json").read_text())["plan"]["pipeline"]["stages"]
    # the first stage holds the token and the position embeddings: (257 + 32) x 32 besides its layers
    assert stages[0]["params"] - stages[1]["params"] == (257 + 32) * 32 - (32 + 257 * 32)
    old = tmp_path / "old.yaml"
    old.write_text(
        path.read_text()
        + "[model]\nmodel: !singleton:fgc.components.causal_lm:CausalLM@model\n"
        "    vocab_size: 257\n    hidden_size: 32\n    num_hidden_layers: 2\n"
        "    layer_factory: *layer\n    norm_factory: *norm\n    rotary_embedding: *positions\n"
    )
    proc = run_fgc("check", old)
    assert proc.returncode == 2
    assert f"old.yaml:{line_of(old, 'rotary_embedding')}: error: fgc.components.causal_lm:CausalLM has no parameter 'rotary_embedding'" in proc.stderr


def test_kernel_selection_reads_what_a_part_declares(tmp_path):
    """A user's norm that declares it runs rms_norm shows in the plan's kernels, chosen by its
    kernel_impl argument; no class name is matched."""
    (tmp_path / "my_norm.py").write_text(
        "from fgc.components.norm import RMSNorm\n\n\n"
        "class ScaledNorm(RMSNorm):\n"
        '    """The library\'s RMSNorm under another name."""\n'
    )
    extra = (
        "[norm]\n.norm: &norm !partial:.my_norm:ScaledNorm@norm_factory\n    kernel_impl: torch\n"
    )
    path = small_config(tmp_path, extra=extra)
    out = tmp_path / "build"
    run_fgc("build", path, "-o", out, check=True)
    kernels = json.loads((out / "manifest.json").read_text())["plan"]["kernels"]
    assert kernels["rms_norm"] == {"impl": "torch", "reason": "chosen in the config, kernel_impl"}
    assert kernels["swiglu"]["impl"] == "torch" and kernels["apply_rope"]["impl"] == "torch"
