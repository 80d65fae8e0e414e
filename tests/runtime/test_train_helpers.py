"""Loop helpers: loss accounting, schedules, throughput, FLOPs."""

import time

import pytest
import torch
import torch.nn.functional as F

from fgc_runtime.errors import RunError, run_main
from fgc_runtime.metrics import MetricsLogger, eval_record, format_record, train_record
from fgc_runtime.train import (
    Throughput,
    count_targets,
    grad_norm,
    loss_sum_and_count,
    model_flops_per_token,
    peak_memory_bytes,
    set_seed,
)


def test_loss_sum_and_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    labels[1, 4] = -100
    loss_sum, count = loss_sum_and_count(logits, labels)
    expected = F.cross_entropy(
        logits.float().reshape(-1, 11), labels.reshape(-1), reduction="sum"
    )
    assert loss_sum.dtype == torch.float32
    assert torch.equal(loss_sum, expected)
    assert count.dtype == torch.int64 and int(count) == 8
    assert count_targets(labels) == 8
    assert count_targets(labels, ignore_index=3) == int((labels != 3).sum())


def test_loss_rule_is_independent_of_micro_batching():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[0, :5] = -100  # uneven counts per micro-batch
    whole_sum, whole_count = loss_sum_and_count(logits, labels)
    parts = [loss_sum_and_count(logits[i : i + 1], labels[i : i + 1]) for i in range(4)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1))
    assert torch.allclose(total, expected, rtol=1e-6, atol=0)
    assert torch.allclose(whole_sum / whole_count, expected, rtol=1e-6, atol=0)


def test_grad_norm():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    c = torch.nn.Parameter(torch.zeros(1))  # no grad: skipped
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 12.0])
    assert grad_norm([a, b, c]) == pytest.approx(13.0)
    assert grad_norm([c]) == 0.0
    # agrees with the pre-clip norm clip_grad_norm_ returns
    assert grad_norm([a, b]) == pytest.approx(
        float(torch.nn.utils.clip_grad_norm_([a, b], 1e9))
    )


def test_throughput():
    tp = Throughput()
    time.sleep(0.01)
    first = tp.update(1000)
    assert first["tokens"] == 1000
    assert first["elapsed_s"] >= 0.01
    assert first["tokens_per_s"] == pytest.approx(1000 / first["elapsed_s"], rel=0.05)
    second = tp.update(500)
    assert second["tokens"] == 1500
    assert second["elapsed_s"] >= first["elapsed_s"]
    # the rate covers only the interval since the previous update
    assert second["tokens_per_s"] > first["tokens_per_s"]


def test_flops_per_token():
    assert (
        model_flops_per_token(1_000_000, 2, 64, 128)
        == 6 * 1_000_000 + 12 * 2 * 64 * 128
    )


def test_peak_memory_and_seed():
    assert (
        peak_memory_bytes(torch.device("cpu")) > 10 * 2**20
    )  # torch alone takes more than 10 MiB
    set_seed(5)
    a = torch.rand(3)
    set_seed(5)
    assert torch.equal(a, torch.rand(3))


def test_metrics_logger(tmp_path):
    out = tmp_path / "run"
    record = train_record(10, 3.5, 1e-3, 1.25, 12345, 12345.6, None, 2048, 1.5, 65.0)
    assert list(record) == [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "mfu",
        "peak_mem_bytes",
        "elapsed_s",
        "eta_s",
    ]
    logger = MetricsLogger(out)
    logger.log(record)
    logger.log(eval_record(10, 3.25))
    logger.close()
    logger = MetricsLogger(out, start_step=10)  # a run resumed at step 10 appends
    logger.log({"step": 11, "eval_loss": 3.0})
    logger.close()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == (
        '{"step": 10, "loss": 3.5, "lr": 0.001, "grad_norm": 1.25, "tokens": 12345, '
        '"tokens_per_s": 12345.6, "mfu": null, "peak_mem_bytes": 2048, "elapsed_s": 1.5, "eta_s": 65.0}'
    )
    assert lines[1:] == [
        '{"step": 10, "eval_loss": 3.25}',
        '{"step": 11, "eval_loss": 3.0}',
    ]
    assert (
        format_record(record)
        == "step 10 | loss 3.5000 | lr 1.00e-03 | grad_norm 1.25 | 12,346 tok/s | peak 0.00 GiB | eta 1m05s"
    )
    MetricsLogger(tmp_path / "other", enabled=False).log(record)
    assert not (tmp_path / "other").exists()


def test_run_error_and_run_main(capsys):
    assert str(RunError("bad", path="data/x")) == "data/x: error: bad"
    assert str(RunError("bad")) == "error: bad"

    def main(argv):
        assert argv == ["--x"]
        raise RunError("no such checkpoint", path="ck")

    with pytest.raises(SystemExit) as info:
        run_main(main, ["--x"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "ck: error: no such checkpoint\n"

    def bug(argv):
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_main(bug)


def test_param_groups_by_name_patterns():
    import torch
    from torch import nn

    from fgc_runtime.optim import describe_groups, param_groups

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: one parameter, listed once

    model = Tiny()
    groups = param_groups(model, ["norm", "bias", "embed"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [names[id(p)] for p in groups[0]["params"]] == ["proj.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == ["embed.weight", "proj.bias", "norm.weight", "norm.bias"]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    text = describe_groups(model, optimizer).splitlines()
    assert text[0] == "embed.weight  (10, 4)  group=no_decay  lr=0.1  weight_decay=0.0"
    assert "proj.weight  (4, 4)  group=decay  lr=0.1  weight_decay=0.5" in text
    assert param_groups(model, []) == [{"name": "decay", "params": list(model.parameters())}]
