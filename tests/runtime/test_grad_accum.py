"""Gradient accumulation: batch 8 x 1 micro-batch and batch 1 x 8 micro-batches give the same
gradients on padded variable-length data, because every micro-batch's loss sum is divided by the
step's global count of non-ignored targets (the rule the generated trainers follow)."""

import torch
import torch.nn.functional as F
from torch import nn

from fgc_runtime.train import count_targets, loss_sum_and_count

VOCAB, WIDTH, SEQ = 23, 16, 12


class TinyCausalLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids_BT):
        x_BTD = self.embed(ids_BT)
        q, k, v = self.qkv(x_BTD).chunk(3, dim=-1)
        x_BTD = x_BTD + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x_BTD)


def padded_batch(seed=0):
    """8 documents of 3 to 12 tokens, right-padded with 0; padded targets are -100."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 12, 5, 9, 4, 12, 7, 6]
    ids = torch.zeros(8, SEQ + 1, dtype=torch.long)
    labels = torch.full((8, SEQ), -100)
    for row, n in enumerate(lengths):
        ids[row, : n + 1] = torch.randint(1, VOCAB, (n + 1,), generator=gen)
        labels[row, :n] = ids[row, 1 : n + 1]
    return ids[:, :-1], labels


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def accumulate(model, ids, labels, micro_batch, normalise):
    """Forward/backward in micro-batches of MICRO_BATCH rows; returns the gradients."""
    model.zero_grad(set_to_none=True)
    n_targets = count_targets(labels)  # the step's global count, known before the first backward
    steps = ids.shape[0] // micro_batch
    for m in range(steps):
        rows = slice(m * micro_batch, (m + 1) * micro_batch)
        loss_sum, count = loss_sum_and_count(model(ids[rows]), labels[rows])
        if normalise == "global":
            (loss_sum / n_targets).backward()
        else:  # the naive rule: each micro-batch's own mean, averaged over micro-batches
            (loss_sum / count / steps).backward()
    return grads(model)


def test_batch_8_equals_8_micro_batches_of_1_on_padded_data():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids, labels = padded_batch()
    whole = accumulate(model, ids, labels, micro_batch=8, normalise="global")
    split = accumulate(model, ids, labels, micro_batch=1, normalise="global")
    # the model is fp64 but loss_sum_and_count computes the cross-entropy in fp32 (as in training):
    # fp32 rounding is the only difference left
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # it is also the gradient of the plain token mean over the whole batch
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    for a, b in zip(whole, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_per_micro_batch_means_would_differ():
    """The test above can fail: averaging each micro-batch's own mean weighs short documents
    more, and its gradients are measurably different on this data."""
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids, labels = padded_batch()
    whole = accumulate(model, ids, labels, micro_batch=8, normalise="global")
    naive = accumulate(model, ids, labels, micro_batch=1, normalise="per-micro-batch")
    assert max(float((a - b).abs().max()) for a, b in zip(whole, naive)) > 1e-3
