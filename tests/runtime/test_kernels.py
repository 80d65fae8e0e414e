"""Kernels: the torch paths equal straightforward references exactly (fp32)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fgc_runtime.kernels import apply_rope, rms_norm, swiglu


def reference_rms_norm(x, weight, eps, offset):
    x32 = x.float()
    return (
        x32
        * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        * (offset + weight.float())
    ).to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 3, 8), (5, 7, 123), (4, 64)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_fp32(shape, offset):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w = torch.randn(shape[-1])
    for impl in ("auto", "torch"):
        assert torch.equal(
            rms_norm(x, w, eps=1e-5, offset=offset, impl=impl),
            reference_rms_norm(x, w, 1e-5, offset),
        )


def test_rms_norm_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48)
    assert torch.allclose(rms_norm(x, norm.weight), norm(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_bf16():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 123, dtype=torch.bfloat16)
    w = torch.randn(123, dtype=torch.bfloat16)
    out = rms_norm(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference_rms_norm(x, w, 1e-6, 0.0))


def test_swiglu():
    torch.manual_seed(3)
    gate = torch.randn(5, 7, 431)
    up = torch.randn(5, 7, 431)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)
    assert torch.equal(swiglu(gate, up, impl="torch"), F.silu(gate) * up)
    assert torch.allclose(
        swiglu(gate, up), gate * torch.sigmoid(gate) * up, rtol=1e-6, atol=1e-6
    )
    bf16 = swiglu(gate.bfloat16(), up.bfloat16())
    assert bf16.dtype == torch.bfloat16 and torch.equal(
        bf16, F.silu(gate.bfloat16()) * up.bfloat16()
    )


@pytest.mark.parametrize("shape", [(2, 4, 10, 16), (1, 3, 7, 6)])
def test_apply_rope_matches_transformers(shape):
    torch.manual_seed(4)
    B, H, T, D = shape
    q = torch.randn(B, H, T, D)
    k = torch.randn(B, 1, T, D)  # fewer key heads (GQA) broadcast the same way
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().expand(B, T, D)
    sin = emb.sin().expand(B, T, D)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_out, k_ref)
    assert q_out.shape == (B, H, T, D) and k_out.shape == (B, 1, T, D)


def _rope_inputs(dtype, B=2, H=4, K=2, T=10, D=8):
    torch.manual_seed(5)
    q = torch.randn(B, H, T, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, K, T, D, dtype=dtype, requires_grad=True)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos().expand(B, T, D).to(dtype), emb.sin().expand(B, T, D).to(dtype)
    return q, k, cos, sin, torch.randn_like(q), torch.randn_like(k)


def _rope_forward_backward(fn, q, k, cos, sin, dq, dk):
    q.grad = k.grad = None
    q_out, k_out = fn(q, k, cos, sin)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out, k_out, q.grad, k.grad


def test_bf16_rope_backward_written_out_is_autograds_bitwise():
    """In bf16 apply_rope runs its own backward (inductor compiles autograd's derived one slowly
    on the CPU); eager, outputs and gradients are bitwise those autograd derives. fp32 keeps
    autograd's backward."""
    from fgc_runtime.kernels.rope import apply_rope_torch

    inputs = _rope_inputs(torch.bfloat16)
    q_out, *rest = _rope_forward_backward(apply_rope, *inputs)
    assert type(q_out.grad_fn).__name__ == "_BF16RopeTorchBackward"
    reference = _rope_forward_backward(apply_rope_torch, *inputs)
    for got, want in zip((q_out, *rest), reference):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    q_out, *_ = _rope_forward_backward(apply_rope, *_rope_inputs(torch.float32))
    assert type(q_out.grad_fn).__name__ == "AddBackward0"


def test_compiled_bf16_rope_backward_has_no_slice_backward():
    """Compiled, the bf16 backward is the written-out one (no zero-padded halves, which inductor's
    CPU code loads slowly), and its gradients agree with eager's to bf16 rounding."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = str(gm.graph)
            return make_boxed_func(gm.forward)

        return compiler

    inputs = _rope_inputs(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(
        apply_rope, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), fullgraph=True
    )
    got = _rope_forward_backward(compiled, *inputs)
    assert "slice_backward" not in graphs["backward"] and "cat" in graphs["backward"]
    for g, want in zip(got, _rope_forward_backward(apply_rope, *inputs)):
        torch.testing.assert_close(g.float(), want.float(), rtol=1e-2, atol=1e-2)
    inputs32 = _rope_inputs(torch.float32)
    torch._dynamo.reset()
    _rope_forward_backward(compiled, *inputs32)
    assert "slice_backward" in graphs["backward"]  # fp32: autograd's own, which compiles well


def test_impl_argument(monkeypatch):
    """impl='triton' on CPU tensors outside Triton's interpreter, or without triton, is a clear
    error naming the way out; an unknown impl is an error too."""
    import importlib.util

    x = torch.randn(2, 4)
    w = torch.ones(4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    msg = (
        "impl='triton' runs on CUDA tensors, got cpu ones (TRITON_INTERPRET=1 runs the kernels on the "
        "CPU in Triton's interpreter, slowly: for tests); use impl='torch' or 'auto'"
    )
    with pytest.raises(ValueError) as info:
        rms_norm(x, w, impl="triton")
    assert str(info.value) == msg
    with pytest.raises(ValueError, match="impl='triton' runs on CUDA tensors, got cpu ones"):
        swiglu(x, x, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' runs on CUDA tensors, got cpu ones"):
        apply_rope(x[None, None], x[None, None], x[None], x[None], impl="triton")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"impl='triton' needs the triton package \(pip install triton\)"):
        swiglu(x, x, impl="triton")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        swiglu(x, x, impl="cuda")


# -- attention: eager bf16 on the CPU runs in fp32 ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_in_low_precision_is_fp32_attention_cast_back(dtype):
    """On the CPU, eager bf16/fp16 attention equals fp32 SDPA of the same (upcast) inputs, cast back,
    inside autocast too (which would otherwise run SDPA in bf16), gradients included."""
    from fgc_runtime.kernels import scaled_dot_product_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 24).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 16, 24).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 16, 24).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=True, enable_gqa=True)
    assert torch.equal(y, ref.to(dtype))
    ref.to(dtype).float().square().sum().backward()
    for got, want in ((q, ref_q), (k, ref_k), (v, ref_v)):
        assert torch.equal(got.grad, want.grad.to(dtype))
    # bf16 SDPA itself gives other values: the rule is not a no-op
    low = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True, enable_gqa=True)
    assert not torch.equal(low, y.detach())


def test_fp32_attention_is_sdpa_as_called():
    from fgc_runtime.kernels import scaled_dot_product_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(scaled_dot_product_attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


# -- attention: bf16 causal self-attention in compiled code runs by query chunks ---------------


def _fp64_attention_and_grads(q, k, v, dy, **kwargs):
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y = F.scaled_dot_product_attention(*ref, **kwargs)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in ref]


@pytest.mark.parametrize("backward", ["saved probabilities", "recomputed probabilities"])
@pytest.mark.parametrize(
    "B,H,K,T,E,chunk",
    [
        (2, 4, 2, 40, 8, 16),  # grouped heads, three chunks, the last one short
        (1, 3, 3, 33, 16, 8),  # one key/value head per query head, five chunks
        (2, 4, 1, 24, 24, 128),  # one chunk: every query at once
    ],
)
def test_attention_by_query_chunks_is_causal_sdpa_to_bf16_rounding(monkeypatch, B, H, K, T, E, chunk, backward):
    """The output and the gradients of q, k and v match fp64 SDPA (causal, grouped heads) as
    closely as bf16 inputs and bf16 matmuls allow: a chunk that saw a wrong key, or a gradient
    that missed a chunk, is off by far more. Both backwards: with the forward's probabilities
    and with them recomputed."""
    from fgc_runtime.kernels import attention

    monkeypatch.setattr(attention, "CHUNK", chunk)
    save = backward == "saved probabilities"
    torch.manual_seed(0)
    q = torch.randn(B, H, T, E).bfloat16().requires_grad_()
    k = torch.randn(B, K, T, E).bfloat16().requires_grad_()
    v = torch.randn(B, K, T, E).bfloat16().requires_grad_()
    dy = torch.randn(B, H, T, E).bfloat16()
    want_y, want_grads = _fp64_attention_and_grads(q, k, v, dy, is_causal=True, enable_gqa=True)
    y = attention.causal_attention_by_query_chunks(q, k, v, save_probabilities=save)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert (y.double() - want_y).abs().max() <= 0.02 * want_y.abs().max()
    for got, want in zip((q.grad, k.grad, v.grad), want_grads):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()
    # the scale is the one asked for
    y2 = attention.causal_attention_by_query_chunks(
        q.detach(), k.detach(), v.detach(), scale=0.5, save_probabilities=save
    )
    want_y2, _ = _fp64_attention_and_grads(q, k, v, dy, is_causal=True, enable_gqa=True, scale=0.5)
    assert (y2.double() - want_y2).abs().max() <= 0.02 * want_y2.abs().max()
    assert (y2.double() - want_y).abs().max() > 0.1


@pytest.mark.parametrize("T", [40, 41])
def test_compiled_attention_by_query_chunks_keeps_t_by_t_values_only_up_to_its_limit(monkeypatch, T):
    """What a compiled backward keeps from the forward: each chunk's bf16 probabilities while T is
    at most SAVE_PROBABILITIES_MAX_T, and beyond it nothing of T x T, as flash attention.
    (AOT autograd's common-subexpression elimination once merged the backward's recomputed
    scores with the forward's, and so kept every chunk's scores.) Gradients match fp64 both ways."""
    from fgc_runtime.kernels import attention

    monkeypatch.setattr(attention, "CHUNK", 16)
    monkeypatch.setattr(attention, "SAVE_PROBABILITIES_MAX_T", 40)
    torch.manual_seed(0)
    B, H, K, E = 2, 4, 2, 8
    q = torch.randn(B, H, T, E).bfloat16().requires_grad_()
    k = torch.randn(B, K, T, E).bfloat16().requires_grad_()
    v = torch.randn(B, K, T, E).bfloat16().requires_grad_()
    dy = torch.randn(B, H, T, E).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(attention.causal_attention_by_query_chunks, backend="aot_eager", fullgraph=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = compiled(q, k, v)
    # every dimension of q, k, v and the log-sum-exp but one is below 16: two of 16 or more are
    # a chunk's queries by the keys it sees
    t_by_t = sorted(s[-2:] for s in shapes if sum(d >= 16 for d in s) >= 2)
    if T <= 40:
        assert t_by_t == [(16, 40), (32, 16), (32, 32)], shapes  # per chunk: (2 heads x C queries, N keys)
    else:
        assert t_by_t == [], shapes
    y.backward(dy)
    want_y, want_grads = _fp64_attention_and_grads(q, k, v, dy, is_causal=True, enable_gqa=True)
    assert (y.double() - want_y).abs().max() <= 0.02 * want_y.abs().max()
    for got, want in zip((q.grad, k.grad, v.grad), want_grads):
        assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()


def test_chunk_size_caps_the_number_of_chunks():
    from fgc_runtime.kernels.attention import CHUNK, MAX_CHUNKS, chunk_size

    assert chunk_size(100) == chunk_size(CHUNK * MAX_CHUNKS) == CHUNK
    assert chunk_size(4096) == 4096 // MAX_CHUNKS
    assert -(-4097 // chunk_size(4097)) == MAX_CHUNKS


def _sdpa_graph(q, k, v, grad=True, **kwargs) -> str:
    """The FX graph torch.compile traces for the runtime's SDPA called with these arguments."""
    from fgc_runtime.kernels import scaled_dot_product_attention

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: scaled_dot_product_attention(q, k, v, **kwargs), backend=backend, fullgraph=True)
    with torch.set_grad_enabled(grad):
        compiled(q, k, v)
    return "\n".join(graphs)


def test_compiled_cpu_bf16_causal_attention_runs_by_query_chunks():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, 16, 8).bfloat16().requires_grad_() for _ in range(2))
    graph = _sdpa_graph(q, k, v, is_causal=True, enable_gqa=True)
    assert "autograd_function_apply" in graph
    assert "scaled_dot_product_attention" not in graph


@pytest.mark.parametrize(
    "case",
    ["fp16", "fp32", "mask", "dropout", "not causal", "fewer queries than keys", "no gradients"],
)
def test_compiled_attention_that_is_not_bf16_causal_self_attention_is_sdpa(case):
    torch.manual_seed(0)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(case, torch.bfloat16)
    T = 8 if case == "fewer queries than keys" else 16
    q = torch.randn(2, 4, T, 8).to(dtype)
    k, v = (torch.randn(2, 4, 16, 8).to(dtype) for _ in range(2))
    kwargs = {"is_causal": case != "not causal"}
    if case == "mask":
        kwargs = {"attn_mask": torch.ones(16, 16, dtype=torch.bool).tril()}
    if case == "dropout":
        kwargs["dropout_p"] = 0.1
    graph = _sdpa_graph(q, k, v, grad=case != "no gradients", **kwargs)
    assert "scaled_dot_product_attention" in graph
    assert "autograd_function_apply" not in graph
