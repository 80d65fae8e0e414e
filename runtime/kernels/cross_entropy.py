"""The LM head and its cross-entropy in one call (docs/package.md, kernels).

``fused_linear_cross_entropy(hidden, weight, labels, ...)`` equals
``cross_entropy(softcap(hidden @ weight.T + bias), labels)`` (+ ``z_loss * logsumexp²`` over the
same rows). Three implementations:

- ``torch``: the reference. It materialises every logit (N x V in fp32) and lets autograd do the
  rest.
- ``chunked``: rows in chunks; each chunk's logits exist only while that chunk's loss and gradients
  (with respect to the hidden states, the weight and the bias) are computed, in the forward. A
  chunk has ``chunk_size`` rows, or (``chunk_size=None``) as many as keep its fp32 logits and their
  gradient under ``chunk_budget`` bytes (:func:`chunk_rows`: 8 bytes a logit), so peak memory
  holds one budget's worth of logits however large the vocabulary. The backward only scales the
  stored gradients. Supports bias, ``ignore_index``, label smoothing, z-loss and soft-capping, with
  ``reduction`` ``sum`` or ``mean``; not ``reduction="none"`` (see :data:`CAPABILITIES`: fgc's
  kernel-selection pass reads it and rejects a config that asks a kernel for a feature it lacks,
  rather than dropping the feature).
- ``triton``: the chunks of ``chunked`` (the same driver, :func:`run_chunks`, and chunk size),
  with everything between the matmuls (the logsumexp, the loss and the logits' gradient) in one
  Triton kernel (``fgc_runtime.kernels.triton.cross_entropy``, imported only then). Every feature
  and reduction of the reference; CUDA tensors (CPU ones in Triton's interpreter,
  ``TRITON_INTERPRET=1``: for tests).

Shape legend: N rows (tokens), D hidden size, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._impl import check_impl_devices, triton_kernel

IMPLS = ("auto", "torch", "chunked", "triton")
# the chunked loss's default budget for one chunk's fp32 logits and their gradient
DEFAULT_CHUNK_BUDGET = 64 * 2**20
# bytes a chunk holds per logit: the fp32 logit and its fp32 gradient
CHUNK_BYTES_PER_LOGIT = 8

# What each implementation supports (fgc's select-kernels pass reads this at build time).
CAPABILITIES = {
    "torch": {
        "devices": ("cpu", "cuda"),
        "dtypes": ("float32", "bfloat16", "float16"),
        # document_masking: the trainer passes document ids through the model's own forward
        "features": ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap", "document_masking"),
        "reductions": ("mean", "sum", "none"),
    },
    "chunked": {
        "devices": ("cpu", "cuda"),
        "dtypes": ("float32", "bfloat16", "float16"),
        "features": ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap"),
        "reductions": ("mean", "sum"),
    },
    "triton": {
        "devices": ("cuda",),
        "dtypes": ("float32", "bfloat16", "float16"),
        "features": ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap"),
        "reductions": ("mean", "sum", "none"),
    },
}


def _row_losses(logits_NV, labels_N, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row losses in fp32 (0 where ignored) and the mask of non-ignored rows: the definition
    every implementation is tested against."""
    logits_NV = logits_NV.float()
    if softcap is not None:
        logits_NV = softcap * torch.tanh(logits_NV / softcap)
    loss_N = F.cross_entropy(
        logits_NV, labels_N, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid_N = labels_N != ignore_index
    if z_loss:
        lse_N = torch.logsumexp(logits_NV, dim=-1)
        loss_N = loss_N + z_loss * torch.where(valid_N, lse_N.square(), torch.zeros_like(lse_N))
    return loss_N, valid_N


def _reference(hidden_ND, weight_VD, labels_N, bias_V, ignore_index, reduction, label_smoothing, z_loss, softcap):
    logits_NV = hidden_ND @ weight_VD.T
    if bias_V is not None:
        logits_NV = logits_NV + bias_V
    loss_N, valid_N = _row_losses(logits_NV, labels_N, ignore_index, label_smoothing, z_loss, softcap)
    if reduction == "none":
        return loss_N
    total = loss_N.sum()
    if reduction == "sum":
        return total
    return total / valid_N.sum().clamp(min=1)


def chunk_rows(vocab_size: int, budget: int = DEFAULT_CHUNK_BUDGET) -> int:
    """Rows of one chunk of the chunked loss: the most whose fp32 logits and their fp32 gradient
    (``rows * vocab_size * 8`` bytes) fit in ``budget`` bytes, and at least 1."""
    if vocab_size < 1 or budget < 1:
        raise ValueError(f"chunk_rows needs a vocabulary and a budget of at least 1, got {vocab_size} and {budget}")
    return max(1, budget // (CHUNK_BYTES_PER_LOGIT * vocab_size))


def _torch_chunk(logits_CV, y_C, valid_C, w_C, label_smoothing, z_loss, softcap, grad, capped_CV=None):
    """One chunk's per-row losses (fp32, 0 where ignored) from its fp32 logits LOGITS_CV (before
    soft-capping), in torch; with GRAD, also ``d loss / d logits`` for row weights W_C, written over
    the buffers (LOGITS_CV, or CAPPED_CV, a second buffer of its shape, when soft-capping)."""
    V = logits_CV.shape[1]
    if softcap is not None:
        # t = tanh(x / cap) kept in the logits' buffer; z = cap * t is what the loss sees
        tanh_CV = logits_CV.div_(softcap).tanh_()
        logits_CV = torch.mul(tanh_CV, softcap, out=capped_CV)
    safe_y_C1 = torch.where(valid_C, y_C, torch.zeros_like(y_C)).unsqueeze(1)
    target_C = logits_CV.gather(1, safe_y_C1).squeeze(1)
    mean_C = logits_CV.mean(dim=1) if label_smoothing else None
    max_C1 = logits_CV.amax(dim=1, keepdim=True)
    # exp(z - max) in place: from here on the buffer holds the softmax's numerator
    exp_CV = logits_CV.sub_(max_C1).exp_()
    sum_C1 = exp_CV.sum(dim=1, keepdim=True)
    lse_C = (sum_C1.log() + max_C1).squeeze(1)
    loss_C = (1.0 - label_smoothing) * (lse_C - target_C)
    if label_smoothing:
        loss_C = loss_C + label_smoothing * (lse_C - mean_C)
    if z_loss:
        loss_C = loss_C + z_loss * lse_C.square()
    # where(), not a product: an ignored row adds exactly 0 whatever its logits
    loss_C = torch.where(valid_C, loss_C, torch.zeros_like(loss_C))
    if not grad:
        return loss_C, None
    # d loss / d z = w (p (1 + 2 z_loss lse) - (1 - eps) onehot(y) - eps / V), with the row
    # weight w (0 on ignored rows)
    row_C1 = (w_C / sum_C1.squeeze(1)).unsqueeze(1)
    if z_loss:
        row_C1 = row_C1 * (1.0 + 2.0 * z_loss * lse_C).unsqueeze(1)
    grad_CV = exp_CV.mul_(row_C1)
    if label_smoothing:
        grad_CV.sub_((w_C * (label_smoothing / V)).unsqueeze(1))
    grad_CV.scatter_add_(1, safe_y_C1, (-(1.0 - label_smoothing) * w_C).unsqueeze(1))
    if softcap is not None:
        # through z = cap * tanh(x / cap): dz/dx = 1 - t²
        grad_CV.mul_(tanh_CV.square_().neg_().add_(1.0))
    return loss_C, grad_CV


def run_chunks(hidden_ND, weight_VD, bias_V, labels_N, valid_N, roww_N, needs, chunk_size, chunk_fn, capped=False):
    """The chunked loss's driver, shared by the torch (``chunked``) and Triton implementations.

    Rows go ``chunk_size`` at a time: a chunk's fp32 logits (the matmul, and bias, in the inputs'
    dtype, then fp32: the reference's rounding) go into one buffer reused by every chunk;
    ``chunk_fn(logits_CV, y_C, valid_C, w_C, grad, capped_CV)`` gives the chunk's per-row losses
    and, when a gradient is needed, ``d loss / d logits`` for the row weights ROWW_N (written over
    the buffer); the gradients of the hidden states, weight and bias follow from it by matmuls.
    NEEDS says which of the three gradients to compute (none: losses only). With CAPPED, a second
    buffer of the chunk's shape is passed as ``capped_CV`` (else None).

    Returns ``(loss_N, grad_hidden_ND, grad_weight_VD, grad_bias_V)``: per-row losses in fp32 (0 on
    ignored rows), the hidden states' gradient in their dtype, the weight's and bias's in fp32
    (None where not needed).
    """
    N, V = hidden_ND.shape[0], weight_VD.shape[0]
    grad = any(needs)
    fp32 = hidden_ND.dtype == weight_VD.dtype == torch.float32 and (bias_V is None or bias_V.dtype == torch.float32)
    grad_hidden_ND = torch.empty_like(hidden_ND) if needs[0] else None
    grad_weight_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if needs[1] else None
    grad_bias_V = torch.zeros(V, dtype=torch.float32, device=weight_VD.device) if bias_V is not None and needs[2] else None
    loss_N = hidden_ND.new_empty(N, dtype=torch.float32)
    C = min(chunk_size, N)
    # One fp32 buffer for a chunk's logits, reused by every chunk and turned into their
    # gradient in place; the torch code's soft-capping needs a second (the gradient goes through tanh).
    buf_CV = hidden_ND.new_empty((C, V), dtype=torch.float32)
    capped_CV = hidden_ND.new_empty((C, V), dtype=torch.float32) if capped else None
    for start in range(0, N, C):
        h_CD = hidden_ND[start : start + C]
        c = h_CD.shape[0]
        logits_CV = buf_CV[:c]
        if fp32:  # straight into the buffer: no temporary
            if bias_V is None:
                torch.mm(h_CD, weight_VD.T, out=logits_CV)
            else:
                torch.addmm(bias_V, h_CD, weight_VD.T, out=logits_CV)
        else:  # the reference's rounding: the matmul (and bias) in the inputs' dtype, then fp32
            low_CV = h_CD @ weight_VD.T
            logits_CV.copy_(low_CV + bias_V if bias_V is not None else low_CV)
            del low_CV
        loss_C, grad_CV = chunk_fn(
            logits_CV,
            labels_N[start : start + C],
            valid_N[start : start + C],
            roww_N[start : start + C],
            grad,
            None if capped_CV is None else capped_CV[:c],
        )
        loss_N[start : start + c] = loss_C
        if grad_hidden_ND is not None:
            if fp32:
                torch.mm(grad_CV, weight_VD, out=grad_hidden_ND[start : start + c])
            else:
                grad_hidden_ND[start : start + c] = (grad_CV.to(weight_VD.dtype) @ weight_VD).to(hidden_ND.dtype)
        if grad_weight_VD is not None:
            grad_weight_VD.addmm_(grad_CV.T, h_CD if fp32 else h_CD.float())
        if grad_bias_V is not None:
            grad_bias_V += grad_CV.sum(dim=0)
    return loss_N, grad_hidden_ND, grad_weight_VD, grad_bias_V


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden_ND, weight_VD, bias_V, labels_N, ignore_index, label_smoothing, z_loss, softcap, chunk_size, mean
    ):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_V is not None and ctx.needs_input_grad[2])
        valid_N = labels_N != ignore_index
        count = valid_N.sum()
        scale = 1.0 / count.clamp(min=1).float() if mean else torch.ones((), device=hidden_ND.device)
        roww_N = torch.where(valid_N, scale, torch.zeros_like(scale)).float()

        def chunk_fn(logits_CV, y_C, valid_C, w_C, grad, capped_CV):
            return _torch_chunk(logits_CV, y_C, valid_C, w_C, label_smoothing, z_loss, softcap, grad, capped_CV)

        loss_N, grad_hidden_ND, grad_weight_VD, grad_bias_V = run_chunks(
            hidden_ND, weight_VD, bias_V, labels_N, valid_N, roww_N, needs, chunk_size, chunk_fn, softcap is not None
        )
        ctx.save_for_backward(
            grad_hidden_ND if grad_hidden_ND is not None else torch.empty(0),
            grad_weight_VD.to(weight_VD.dtype) if grad_weight_VD is not None else torch.empty(0),
            grad_bias_V.to(bias_V.dtype) if grad_bias_V is not None else torch.empty(0),
        )
        ctx.has = (grad_hidden_ND is not None, grad_weight_VD is not None, grad_bias_V is not None)
        return loss_N.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [g * grad_out.to(g.dtype) if has else None for g, has in zip((grad_hidden, grad_weight, grad_bias), ctx.has)]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (docs/package.md, kernels).

    ``hidden`` is ``(..., D)`` and ``labels`` the matching ``(...)``. ``reduction``: ``mean`` over
    non-ignored labels, ``sum``, or ``none`` (one value a row, 0 where ignored). ``impl``:
    ``torch`` (the reference), ``chunked``, ``triton`` (CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``; ValueError where it cannot run), or ``auto`` (the reference: fgc's
    select-kernels pass chooses at build time). A feature the chosen implementation lacks raises
    ValueError: it is never dropped. ``chunked`` and ``triton`` run ``chunk_size`` rows at a time, or with
    ``chunk_size=None`` the rows :func:`chunk_rows` gives for the vocabulary and ``chunk_budget``
    (bytes of one chunk's fp32 logits and their gradient).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected one of {', '.join(map(repr, IMPLS))}")
    chosen = "torch" if impl == "auto" else impl
    wanted = {
        "bias": bias is not None,
        "label_smoothing": bool(label_smoothing),
        "z_loss": bool(z_loss),
        "softcap": softcap is not None,
    }
    caps = CAPABILITIES[chosen]
    missing = [name for name, used in wanted.items() if used and name not in caps["features"]]
    if reduction not in caps["reductions"]:
        missing.append(f"reduction={reduction!r}")
    if missing:
        raise ValueError(f"the {chosen} implementation of fused_linear_cross_entropy does not support {', '.join(missing)}")
    hidden_ND = hidden.reshape(-1, hidden.shape[-1])
    labels_N = labels.reshape(-1)
    if chosen == "triton":
        # the package and device checks every Triton kernel makes, then the kernel (imports triton)
        check_impl_devices("triton", {t.device.type for t in (hidden_ND, weight) + ((bias,) if bias is not None else ())})
        loss = triton_kernel("cross_entropy", "fused_linear_cross_entropy_triton")(
            hidden_ND, weight, labels_N, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
            chunk_size, chunk_budget,
        )
        return loss.reshape(labels.shape) if reduction == "none" else loss
    if chosen == "torch":
        loss = _reference(hidden_ND, weight, labels_N, bias, ignore_index, reduction, label_smoothing, z_loss, softcap)
        return loss.reshape(labels.shape) if reduction == "none" else loss
    rows = chunk_rows(weight.shape[0], int(chunk_budget)) if chunk_size is None else int(chunk_size)
    if rows < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden_ND.shape[0] == 0:  # no rows: the reference's empty sum (or mean over nothing)
        return _reference(hidden_ND, weight, labels_N, bias, ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _ChunkedLinearCrossEntropy.apply(
        hidden_ND, weight, bias, labels_N, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), rows, reduction == "mean",
    )


def cross_entropy_sum_and_count(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits ``(..., V)``: the summed loss (fp32) over non-ignored labels, with label
    smoothing, z-loss and soft-capping as in :func:`fused_linear_cross_entropy`, and the count of
    those labels (int64)."""
    loss_N, valid_N = _row_losses(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index, label_smoothing, z_loss, softcap
    )
    return loss_N.sum(), valid_N.sum(dtype=torch.int64)


class LMHeadLoss(torch.nn.Module):
    """A causal LM whose forward returns ``(loss_sum, count)`` from the last hidden states and the
    head's weight through :func:`fused_linear_cross_entropy`, never holding every logit at once.

    MODEL says both (the component library's ``CausalLM`` does): ``model.hidden_states(input_ids)``
    gives the final-normed hidden states and ``model.output_projection()`` the ``(weight, bias)``
    of a head that is exactly ``hidden @ weight.T + bias``. Wrap this module (not MODEL) in DDP, or
    make it FSDP2's root (:func:`fgc_runtime.parallel.apply_fsdp` with ``root=``), so that the
    loss, head included, is part of the forward they see: FSDP2 then gathers the head's weight for
    the whole loss and reduces its gradient after the backward. Parameter names keep a ``model.``
    prefix here only (checkpoints are written from MODEL). Called without labels it returns
    MODEL's logits (for sampling through the FSDP2 root). A pipeline's last stage, which returns
    hidden states, computes its loss with :meth:`loss_from_hidden`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        impl: str = "chunked",
        chunk_size: int | None = None,
        chunk_budget: int = DEFAULT_CHUNK_BUDGET,
        **features,
    ):
        super().__init__()
        # methods of the model's class (a submodule of that name is not one)
        missing = [m for m in ("hidden_states", "output_projection") if not callable(getattr(type(model), m, None))]
        if missing:
            # fgc's select-kernels pass refuses such a model at build time
            raise TypeError(f"LMHeadLoss: the model has no {' and no '.join(m + '()' for m in missing)}")
        self.model = model
        self.impl, self.chunk_size, self.chunk_budget, self.features = impl, chunk_size, chunk_budget, features

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """``(loss_sum, count)`` of INPUT_IDS against LABELS; MODEL's logits when LABELS is None."""
        if labels is None:
            return self.model(input_ids)
        return self.loss_from_hidden(self.model.hidden_states(input_ids), labels)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, count)`` from the final-normed hidden states ``(..., D)`` through MODEL's
        head (its ``output_projection()``), with this module's implementation and features."""
        projection = self.model.output_projection()
        if projection is None:  # fgc's select-kernels pass refuses such a model at build time
            raise TypeError("LMHeadLoss: the model's head scales or soft-caps its logits")
        weight, bias = projection
        loss_sum = fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, reduction="sum",
            impl=self.impl, chunk_size=self.chunk_size, chunk_budget=self.chunk_budget, **self.features,
        )
        return loss_sum, (labels != -100).sum(dtype=torch.int64)
