"""Attention: torch's ``scaled_dot_product_attention``, with two rules for the CPU.

On the CPU, torch's flash-attention kernel is slower in bf16 than in fp32 at short sequences:
forward and backward of a causal attention take about 2x to 4x as long at a head dim of 24 and
T 128, and as long at 64 and T 256 (torch 2.13 on an AVX512-BF16 CPU; docs/development.md,
"The trainer"). So on the CPU:

1. In code that ``torch.compile`` traces with gradients on (a training step), bf16 causal
   self-attention (no mask, no dropout) runs ``causal_attention_by_query_chunks``: bf16 matmuls
   over the keys each chunk of queries can see, softmax in fp32. Inductor fuses the work between
   the matmuls, and the chunks skip most of the masked half of the scores: forward and backward
   take about half the time of fp32 flash attention at T 256 to 1024, 0.7x at 2048 to 4096
   (docs/development.md, "Attention on the CPU"). Run eagerly, the same code is slower than
   flash attention, so eager code keeps rule 2. So do forward passes without gradients
   (evaluation, sampling): the chunks are laid out for one T, so a compiled forward over a
   growing T (sampling) would compile again for each length.
2. Otherwise bf16 and fp16 queries, keys and values are attended in fp32, outside autocast, and the
   output is cast back to their dtype: faster, and more precise.

On other devices SDPA runs as called.
Shape legend: B batch, H query heads, K key/value heads, G = H // K query heads per key/value
head, T queries, S keys, E head dim, C queries per chunk, N keys a chunk sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_UPCAST_ON_CPU = (torch.bfloat16, torch.float16)
# Queries per chunk, and the most chunks one attention is split into. torch.compile unrolls the
# loop over chunks, so its compile time grows with their number (32 chunks: about 100 s).
CHUNK = 128
MAX_CHUNKS = 16
# Up to this T the forward saves each chunk's bf16 probabilities for the backward (the causal
# part of T x T per head: at T 512, 320 KiB per batch row and head); beyond it the backward
# recomputes them from the saved log-sum-exp, one more matmul per chunk, and keeps no T x T
# tensor, as flash attention (docs/development.md, "Attention on the CPU").
SAVE_PROBABILITIES_MAX_T = 512
# the keyword arguments of SDPA that the chunked path takes (_chunkable checks their values)
_CHUNKED_KWARGS = {"is_causal", "scale", "enable_gqa", "attn_mask", "dropout_p"}


def scaled_dot_product_attention(
    q_BHTE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``; on the CPU, bf16 causal
    self-attention in compiled code with gradients on runs by query chunks, and other bf16 and
    fp16 inputs are attended in fp32 with the output returned in their dtype."""
    if q_BHTE.device.type == "cpu" and q_BHTE.dtype in _UPCAST_ON_CPU:
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and _chunkable(q_BHTE, k_BKSE, v_BKSE, kwargs):
            return causal_attention_by_query_chunks(q_BHTE, k_BKSE, v_BKSE, scale=kwargs.get("scale"))
        with torch.autocast("cpu", enabled=False):
            y_BHTE = F.scaled_dot_product_attention(q_BHTE.float(), k_BKSE.float(), v_BKSE.float(), **kwargs)
        return y_BHTE.to(q_BHTE.dtype)
    return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, **kwargs)


def _chunkable(q_BHTE, k_BKSE, v_BKSE, kwargs) -> bool:
    """Whether SDPA called with these arguments is what ``causal_attention_by_query_chunks``
    computes: bf16, causal, no mask, no dropout, as many keys as queries, and the key/value heads
    shared by equal groups of query heads (``enable_gqa``) or one each."""
    H, K = q_BHTE.shape[1], k_BKSE.shape[1]
    return (
        q_BHTE.dtype == torch.bfloat16
        and k_BKSE.dtype == v_BKSE.dtype == torch.bfloat16
        and set(kwargs) <= _CHUNKED_KWARGS
        and kwargs.get("is_causal", False) is True
        and kwargs.get("attn_mask") is None
        and kwargs.get("dropout_p", 0.0) == 0.0
        and q_BHTE.dim() == k_BKSE.dim() == v_BKSE.dim() == 4
        and q_BHTE.shape[2] == k_BKSE.shape[2] == v_BKSE.shape[2]
        and q_BHTE.shape[3] == k_BKSE.shape[3] == v_BKSE.shape[3]
        and k_BKSE.shape[:2] == v_BKSE.shape[:2]
        and q_BHTE.shape[0] == k_BKSE.shape[0]
        and (H == K or (kwargs.get("enable_gqa", False) and H % K == 0))
    )


def chunk_size(T: int) -> int:
    """Queries per chunk for T queries: ``CHUNK``, or more where that would make more than
    ``MAX_CHUNKS`` chunks."""
    return max(CHUNK, -(-T // MAX_CHUNKS))


def causal_attention_by_query_chunks(
    q_BHTE: torch.Tensor,
    k_BKTE: torch.Tensor,
    v_BKTE: torch.Tensor,
    scale: float | None = None,
    save_probabilities: bool | None = None,
) -> torch.Tensor:
    """Causal self-attention, as ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
    scale=scale, enable_gqa=True)``, for bf16 inputs: the queries in chunks of ``chunk_size(T)``,
    each attending to the keys up to its last query; matmuls in bf16 (fp32 accumulation), the
    scores, softmax and the gradients of the keys and values in fp32. Up to
    ``SAVE_PROBABILITIES_MAX_T`` (or where ``save_probabilities`` is true) the backward uses each
    chunk's bf16 probabilities, saved by the forward; beyond it (or where ``save_probabilities``
    is false), it recomputes them from the saved log-sum-exp, so it keeps what flash attention
    keeps (no T x T tensor). Runs outside autocast; returns bf16."""
    scale = q_BHTE.shape[-1] ** -0.5 if scale is None else scale
    if save_probabilities is None:
        save_probabilities = q_BHTE.shape[2] <= SAVE_PROBABILITIES_MAX_T
    with torch.autocast(q_BHTE.device.type, enabled=False):
        return _CausalByQueryChunks.apply(q_BHTE, k_BKTE, v_BKTE, scale, save_probabilities)


def _chunks(T: int):
    C = chunk_size(T)
    return [(s, min(s + C, T)) for s in range(0, T, C)]


def _scores(qc_BKME, k_BKTE, s: int, e: int, scale: float, G: int, transposed: bool = False) -> torch.Tensor:
    """The fp32 scaled scores of queries s..e-1 (grouped: M = G * (e - s) rows per key/value head)
    against keys 0..e-1, masked above the diagonal: ``(B, K, G, C, N)``. ``transposed``
    multiplies K Q^T instead of Q K^T: the backward's recomputation must not be the forward's
    product, or AOT autograd's common-subexpression elimination merges the two and the compiled
    forward keeps every chunk's scores for the backward."""
    B, K = k_BKTE.shape[:2]
    C, N = e - s, e
    if transposed:
        sc_BKMN = torch.matmul(k_BKTE[:, :, :N], qc_BKME.transpose(-1, -2)).transpose(-1, -2)
    else:
        sc_BKMN = torch.matmul(qc_BKME, k_BKTE[:, :, :N].transpose(-1, -2))
    sc_BKGCN = sc_BKMN.reshape(B, K, G, C, N).float() * scale
    # key index above query index, compared in int32: inductor vectorizes a triu of a bool tensor
    # in 64-bit lanes, and the softmax kernel that holds it took about 1.3x as long on the CPU
    keys_N = torch.arange(N, dtype=torch.int32, device=k_BKTE.device)
    queries_C1 = torch.arange(s, e, dtype=torch.int32, device=k_BKTE.device)[:, None]
    return sc_BKGCN.masked_fill(keys_N > queries_C1, float("-inf"))


class _CausalByQueryChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTE, k_BKTE, v_BKTE, scale, save_probabilities):
        B, H, T, E = q_BHTE.shape
        K = k_BKTE.shape[1]
        G = H // K
        q_BKGTE = q_BHTE.reshape(B, K, G, T, E)
        ys, lses, ps = [], [], []
        for s, e in _chunks(T):
            C, N = e - s, e
            qc_BKME = q_BKGTE[:, :, :, s:e].reshape(B, K, G * C, E)
            sc_BKGCN = _scores(qc_BKME, k_BKTE, s, e, scale, G)
            lse_BKGC1 = torch.logsumexp(sc_BKGCN, dim=-1, keepdim=True)
            p_BKMN = torch.exp(sc_BKGCN - lse_BKGC1).to(q_BHTE.dtype).view(B, K, G * C, N)
            ys.append(torch.matmul(p_BKMN, v_BKTE[:, :, :N]).view(B, K, G, C, E))
            lses.append(lse_BKGC1)
            ps.append(p_BKMN)
        y_BHTE = torch.cat(ys, dim=3).view(B, H, T, E)
        lse_BKGT1 = torch.cat(lses, dim=3)
        ctx.save_for_backward(q_BHTE, k_BKTE, v_BKTE, y_BHTE, lse_BKGT1, *(ps if save_probabilities else ()))
        ctx.scale = scale
        return y_BHTE

    @staticmethod
    def backward(ctx, dy_BHTE):
        q_BHTE, k_BKTE, v_BKTE, y_BHTE, lse_BKGT1, *ps = ctx.saved_tensors
        scale = ctx.scale
        B, H, T, E = q_BHTE.shape
        K = k_BKTE.shape[1]
        G = H // K
        dy_BHTE = dy_BHTE.to(q_BHTE.dtype)
        q_BKGTE = q_BHTE.reshape(B, K, G, T, E)
        dy_BKGTE = dy_BHTE.reshape(B, K, G, T, E)
        # rowsum(dP * P) = rowsum(dY * Y): the softmax backward's per-row term
        delta_BKGT1 = (dy_BHTE.float() * y_BHTE.float()).sum(-1).view(B, K, G, T, 1)
        dk_BKTE = torch.zeros(B, K, T, E, dtype=torch.float32, device=k_BKTE.device)
        dv_BKTE = torch.zeros(B, K, T, E, dtype=torch.float32, device=v_BKTE.device)
        dqs = []
        for i, (s, e) in enumerate(_chunks(T)):
            C, N = e - s, e
            qc_BKME = q_BKGTE[:, :, :, s:e].reshape(B, K, G * C, E)
            if ps:  # the probabilities the forward used, saved
                p_BKMN = ps[i]
                p_BKGCN = p_BKMN.view(B, K, G, C, N)
            else:  # recomputed from the log-sum-exp, in bf16 as the forward used them
                sc_BKGCN = _scores(qc_BKME, k_BKTE, s, e, scale, G, transposed=True)
                p_BKGCN = torch.exp(sc_BKGCN - lse_BKGT1[:, :, :, s:e]).to(q_BHTE.dtype)
                p_BKMN = p_BKGCN.view(B, K, G * C, N)
            dyc_BKME = dy_BKGTE[:, :, :, s:e].reshape(B, K, G * C, E)
            dv_BKTE[:, :, :N] += torch.matmul(p_BKMN.transpose(-1, -2), dyc_BKME).float()
            dp_BKGCN = torch.matmul(dyc_BKME, v_BKTE[:, :, :N].transpose(-1, -2)).view(B, K, G, C, N).float()
            ds_BKGCN = p_BKGCN.float() * (dp_BKGCN - delta_BKGT1[:, :, :, s:e]) * scale
            ds_BKMN = ds_BKGCN.to(q_BHTE.dtype).view(B, K, G * C, N)
            dqs.append(torch.matmul(ds_BKMN, k_BKTE[:, :, :N]).view(B, K, G, C, E))
            dk_BKTE[:, :, :N] += torch.matmul(ds_BKMN.transpose(-1, -2), qc_BKME).float()
        dq_BHTE = torch.cat(dqs, dim=3).view(B, H, T, E)
        return dq_BHTE, dk_BKTE.to(k_BKTE.dtype), dv_BKTE.to(v_BKTE.dtype), None, None
