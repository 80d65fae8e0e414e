"""Metrics beyond the record: peak table and MFU, ETA, the progress bar, rank-aware logging,
TensorBoard event files."""

import io
import json

import pytest
import torch
from torch import nn

from fgc_runtime.log import ProgressBar, RankLog, format_duration, render_bar
from fgc_runtime.metrics import MetricsLogger, eta_seconds, eval_record, format_progress, train_record
from fgc_runtime.train import MFU, matmul_dtype, mfu, peak_flops


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM
        ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "tf32", 418e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H200 NVL", "bf16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
        ("NVIDIA L40S", "fp16", 362e12),
        ("NVIDIA L40", "bf16", 181e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6e12),
    ],
)
def test_peak_table_lookup(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


@pytest.mark.parametrize("name", ["cpu", "NVIDIA A10G", "NVIDIA B200", "AMD Instinct MI300X", "Tesla T4"])
def test_unknown_device_has_no_peak(name):
    """A name that only looks like a known one (A10G is not an A10) gives no peak, not a guess."""
    assert peak_flops(name, "bf16") is None


def test_matmul_dtype_of_each_precision_on_cpu():
    cpu = torch.device("cpu")
    assert matmul_dtype("fp32", cpu) == "fp32"
    assert matmul_dtype("bf16-mixed", cpu) == "bf16"
    assert matmul_dtype("bf16", cpu) == "bf16"
    assert matmul_dtype("fp16-mixed", cpu) == "fp16"


def test_mfu_value_and_null():
    assert mfu(1e9, 500.0, 1e12) == pytest.approx(0.5)
    assert mfu(1e9, 500.0, None) is None
    assert mfu(None, 500.0, 1e12) is None


class Shaped(nn.Module):
    num_hidden_layers = 2
    hidden_size = 8

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)  # 72 parameters


def test_mfu_meter_on_cpu_is_null_and_says_why():
    meter = MFU(Shaped(), seq_len=16, precision="fp32", device=torch.device("cpu"))
    assert meter.flops_per_token == 6 * 72 + 12 * 2 * 8 * 16
    assert meter(1e6) is None
    assert meter.describe() == (
        "FLOPs/token = 6N + 12*L*H*T = 6*72 + 12*2*8*16 = 3,504; "
        "MFU: unknown device cpu (fp32), reported as null"
    )


def test_mfu_meter_with_a_known_peak():
    meter = MFU(Shaped(), seq_len=16, precision="bf16", device=torch.device("cpu"))
    meter.device_name, meter.peak = "NVIDIA H100 80GB HBM3", peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert meter(1e9) == pytest.approx(3504 * 1e9 / 989e12)
    assert meter.describe().endswith("peak 989 TFLOP/s (NVIDIA H100 80GB HBM3, dense bf16)")


def test_mfu_meter_without_shape():
    meter = MFU(nn.Linear(2, 2), seq_len=16, precision="fp32", device=torch.device("cpu"))
    assert meter(1e6) is None
    assert "reported as null" in meter.describe()


def test_eta():
    assert eta_seconds(10.0, 5, 20) == pytest.approx(40.0)
    assert eta_seconds(10.0, 5, 0) == 0.0
    assert eta_seconds(0.0, 0, 20) is None
    assert [format_duration(s) for s in (None, 4.4, 65, 3600 + 125)] == ["?", "4s", "1m05s", "1h02m"]
    record = train_record(3, 2.5, 1e-3, 1.0, 10, 1.0, None, 0, 1.0, 125.0)
    assert format_progress(record) == "loss 2.5000 | eta 2m05s"


def test_render_bar():
    assert render_bar(0, 100, width=10) == "  0/100 [----------]   0%"
    assert render_bar(37, 100, width=10) == " 37/100 [###-------]  37%"
    assert render_bar(99, 100, width=10) == " 99/100 [#########-]  99%"
    assert render_bar(100, 100, width=10, suffix="loss 1.0000") == "100/100 [##########] 100% | loss 1.0000"
    assert render_bar(150, 100, width=4) == "100/100 [####] 100%"  # clamped


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_redraws_in_place_under_info_lines():
    out = FakeTTY()
    log = RankLog(0, progress_total=4, stdout=out)
    assert isinstance(log.bar, ProgressBar)
    log.progress(1)
    log.status("loss 2.0000 | eta 3s")
    log.info("step 2 | loss 2.0000")
    log.progress(2)
    log.close()
    text = out.getvalue()
    assert text == (
        "\r1/4 [######------------------]  25%\x1b[K"
        "\r\x1b[K"  # the bar is erased before the line is printed
        "step 2 | loss 2.0000\n"
        "\r1/4 [######------------------]  25% | loss 2.0000 | eta 3s\x1b[K"  # and redrawn under it
        "\r2/4 [############------------]  50% | loss 2.0000 | eta 3s\x1b[K"
        "\n"
    )


def test_plain_lines_when_not_a_terminal_and_info_from_rank_0_only():
    out, err = io.StringIO(), io.StringIO()
    log = RankLog(0, progress_total=4, stdout=out, stderr=err)
    assert log.bar is None
    log.progress(1)
    log.info("step 1 | loss 2.0000")
    log.close()
    assert out.getvalue() == "step 1 | loss 2.0000\n"
    # another rank: no info, no bar even on a terminal; warnings and errors carry the rank
    out1, err1 = FakeTTY(), io.StringIO()
    log1 = RankLog(1, progress_total=4, stdout=out1, stderr=err1)
    log1.info("hidden")
    log1.progress(1)
    log1.warning("the validation split is empty")
    log1.error("out of memory")
    assert out1.getvalue() == ""
    assert err1.getvalue() == "[rank 1] warning: the validation split is empty\n[rank 1] error: out of memory\n"


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(train_record(1, 3.5, 1e-3, 1.25, 100, 50.0, None, 2048, 1.0, 9.0))
    logger.log(train_record(2, 3.0, 2e-3, 1.0, 200, 60.0, None, 2048, 2.0, 8.0))
    logger.log(eval_record(2, 3.25))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/eval_loss" in tags and "train/mfu" not in tags  # mfu is null
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 3.5), (2, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/eval_loss")] == [(2, 3.25)]


def test_no_tensorboard_unless_asked_or_on_other_ranks(tmp_path):
    MetricsLogger(tmp_path / "a").close()
    MetricsLogger(tmp_path / "b", enabled=False, tensorboard=True).close()
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert not (tmp_path / "b").exists()


def test_a_resumed_logger_removes_the_records_after_its_start_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def record(step, loss):
        return train_record(step, loss, 1e-3, 1.0, 100 * step, 10.0, None, 0, 1.0)

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in range(1, 6):
            logger.log(record(step, float(step)))
            if step == 2:
                logger.log(eval_record(2, 9.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill in the middle of a line
    # resumed from the checkpoint of step 3: steps 4 and 5 run again, with other losses here
    with MetricsLogger(tmp_path, tensorboard=True, start_step=3) as logger:
        assert logger.dropped == 3
        for step in (4, 5):
            logger.log(record(step, 10.0 * step))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records] == [
        (1, 1.0), (2, 2.0), (2, 9.0), (3, 3.0), (4, 40.0), (5, 50.0)
    ]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)
    ]


def test_a_fresh_logger_keeps_a_file_without_later_records_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 5.0}\n')
    with MetricsLogger(tmp_path) as logger:
        assert logger.dropped == 0
    assert path.read_text() == '{"step": 0, "eval_loss": 5.0}\n'
