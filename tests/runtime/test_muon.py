"""MuonAdamW: which parameters go to Muon, equality with torch's two optimizers, state round trip."""

import copy

import pytest
import torch
from torch import nn

from fgc_runtime.optim import MuonAdamW, describe_groups, param_groups
from fgc_runtime.train import warmup_cosine

NO_DECAY = ("norm", "bias", "embed")


class TinyLM(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.up_proj = nn.Linear(8, 12)
        self.down_proj = nn.Linear(12, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        x = self.embed_tokens(ids)
        return self.lm_head(self.norm(x + self.down_proj(torch.relu(self.up_proj(x)))))


def make(model, **kw):
    return MuonAdamW(param_groups(model, NO_DECAY, with_names=True), lr=0.02, **kw)


def train_steps(model, opt, sched, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 11, (4, 6), generator=gen)
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_hidden_matrices_go_to_muon_the_rest_to_adamw():
    model = TinyLM()
    opt = make(model)
    groups = {line.split("  ")[0]: line.split("  ")[2] for line in describe_groups(model, opt).splitlines()}
    assert groups == {
        "embed_tokens.weight": "group=adamw/no_decay",
        "up_proj.weight": "group=muon/decay",
        "up_proj.bias": "group=adamw/no_decay",
        "down_proj.weight": "group=muon/decay",
        "norm.weight": "group=adamw/no_decay",
        "norm.bias": "group=adamw/no_decay",
        "lm_head.weight": "group=adamw/decay",
    }
    # every Muon parameter is 2-D; the no-decay group keeps weight_decay 0 on both sides
    for group in opt.param_groups:
        if group["optimizer"] == "muon":
            assert all(p.ndim == 2 for p in group["params"])
        if group["name"].endswith("no_decay"):
            assert group["weight_decay"] == 0.0


def test_tied_embedding_is_adamw_once():
    model = TinyLM(tied=True)
    opt = make(model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(set(params)) == len(list(model.parameters()))
    adamw = [p for g in opt.param_groups if g["optimizer"] == "adamw" for p in g["params"]]
    assert any(p is model.embed_tokens.weight for p in adamw)


def test_steps_equal_torch_muon_and_adamw_side_by_side():
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    opt = make(model, weight_decay=0.1)
    muon_names = {"up_proj.weight", "down_proj.weight"}
    named = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon(
        [named[n] for n in sorted(muon_names)], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    decay = [named["lm_head.weight"]]
    no_decay = [p for n, p in named.items() if n not in muon_names and n != "lm_head.weight"]
    ref_adamw = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.95), weight_decay=0.1
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 11, (4, 6), generator=gen)
        for m in (model, ref):
            nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        opt.zero_grad()
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def test_state_dict_round_trip_continues_bitwise():
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model)
    sched = warmup_cosine(opt, warmup=2, total=10)
    train_steps(model, opt, sched, 3)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict())
    train_steps(model, opt, sched, 3, seed=7)

    resumed = TinyLM()
    resumed.load_state_dict(saved[0])
    opt2 = make(resumed)
    sched2 = warmup_cosine(opt2, warmup=2, total=10)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    train_steps(resumed, opt2, sched2, 3, seed=7)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # the Muon momentum buffers and AdamW moments live in the one state, and the halves see it
    assert opt2._muon.state is opt2.state and opt2._adamw.state is opt2.state
    assert "momentum_buffer" in opt2.state[resumed.up_proj.weight]
    assert "exp_avg" in opt2.state[resumed.lm_head.weight]
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_schedule_drives_both_halves():
    model = TinyLM()
    opt = make(model)
    sched = warmup_cosine(opt, warmup=4, total=10)
    assert [g["name"] for g in opt.param_groups] == ["muon/decay", "adamw/decay", "adamw/no_decay"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 / 5] * 3)
    opt.step()  # no gradients: changes nothing
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 2 / 5] * 3)


def test_unnamed_parameters_are_an_error():
    with pytest.raises(ValueError, match="needs parameter names"):
        MuonAdamW(TinyLM().parameters())
