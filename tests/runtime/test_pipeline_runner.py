"""fgc_runtime.pipeline.Pipeline, what train.py's loop runs for a pipeline, and pipeline_sync,
in one process: the schedule and the mesh are stand-ins, so that what the runner adds (the loss
normalisation, which ranks count the losses, plain sums for evaluation, the forward-only path
of the schedules without an eval mode) is checked apart from torch's schedules (which
tests/test_pipeline.py runs on gloo ranks, exact against one process)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from fgc_runtime import pipeline


def _loss_sum_and_count(logits, labels):
    """A stand-in loss: the sum of the outputs at the target positions, and their count."""
    mask = labels != -100
    return logits[mask].sum(), mask.sum()


class FakeSchedule:
    """Gives one loss per micro-batch through the loss function, as torch's schedules do on the
    ranks of the last stage (LAST), and records its calls."""

    def __init__(self, loss_fn, microbatches, last=True):
        self.loss_fn, self.microbatches, self.last, self.calls = loss_fn, microbatches, last, []

    def _run(self, kind, input_ids, target, losses):
        self.calls.append(kind)
        if self.last:
            for x, y in zip(input_ids.chunk(self.microbatches), target.chunk(self.microbatches)):
                losses.append(self.loss_fn(x.float(), y))

    def step(self, input_ids, target, losses):
        self._run("step", input_ids, target, losses)

    def eval(self, input_ids, target, losses):
        self._run("eval", input_ids, target, losses)


def _pipe(monkeypatch, name="1f1b", tp_rank=0, last=True):
    schedules = []

    def build(schedule_name, stages, microbatches, loss_fn):
        schedules.append(FakeSchedule(loss_fn, microbatches, last))
        return schedules[-1]

    monkeypatch.setattr(pipeline, "build_schedule", build)
    part = torch.nn.Linear(2, 2)
    mesh = SimpleNamespace(tp_rank=tp_rank, pp_rank=0, pp_group=None)
    pipe = pipeline.Pipeline(part, ["stage"], name, 2, _loss_sum_and_count, plan={"pipeline": {}}, mesh=mesh)
    return pipe, schedules[0]


BATCH = torch.tensor([[1, 2, 3], [4, 5, 6]])
LABELS = torch.tensor([[1, -100, 3], [4, 5, -100]])  # 4 targets: 1 + 3 + 4 + 5 = 13


def test_a_step_gives_each_micro_batch_its_share_of_the_global_count_and_returns_the_loss_sum(monkeypatch):
    pipe, schedule = _pipe(monkeypatch)
    loss_sum = pipe.step(BATCH, LABELS, torch.tensor(8.0))
    assert schedule.calls == ["step"]
    assert pipe.step_loss.n_targets == 8.0  # each micro-batch's loss is its sum over it
    assert loss_sum.item() == pytest.approx(13.0)  # scaled back to the sum
    assert not loss_sum.requires_grad


@pytest.mark.parametrize("tp_rank, last", [(1, True), (0, False)], ids=["tp-rank-1", "not-the-last-stage"])
def test_only_the_first_rank_of_the_last_stage_counts_a_steps_loss(monkeypatch, tp_rank, last):
    pipe, _ = _pipe(monkeypatch, tp_rank=tp_rank, last=last)
    assert pipe.step(BATCH, LABELS, torch.tensor(8.0)).item() == 0.0


def test_evaluation_gives_plain_sums_and_the_count(monkeypatch):
    pipe, schedule = _pipe(monkeypatch)
    pipe.step_loss.n_targets = 8.0  # left by a step: evaluation sums plainly
    loss_sum, count = pipe(BATCH, LABELS)
    assert schedule.calls == ["eval"]
    assert (loss_sum.item(), count.item()) == (pytest.approx(13.0), 4.0)


def test_evaluation_off_the_last_stage_gives_zeros(monkeypatch):
    pipe, _ = _pipe(monkeypatch, last=False)
    loss_sum, count = pipe(BATCH, LABELS)
    assert (loss_sum.item(), count.item()) == (0.0, 0.0)


@pytest.mark.parametrize("name", pipeline.FORWARD_ONLY_EVAL)
def test_schedules_without_an_eval_mode_evaluate_forward_only(monkeypatch, name):
    pipe, schedule = _pipe(monkeypatch, name=name)
    seen = []

    def forward_only(stages, plan, pp_rank, group, input_ids, microbatches):
        seen.append((stages, microbatches))
        return [x.float() for x in input_ids.chunk(microbatches)]

    monkeypatch.setattr(pipeline, "forward_only", forward_only)
    loss_sum, count = pipe(BATCH, LABELS)
    assert schedule.calls == [] and seen == [(["stage"], 2)]
    assert (loss_sum.item(), count.item()) == (pytest.approx(13.0), 4.0)


def test_train_and_eval_switch_the_part(monkeypatch):
    pipe, _ = _pipe(monkeypatch)
    assert pipe.eval() is pipe and not pipe.part.training
    assert pipe.train() is pipe and pipe.part.training


@pytest.mark.parametrize("apply_order, sharded", [(["pipeline stages"], False), (["pipeline stages", "fsdp2 per stage"], True)])
def test_pipeline_sync_reads_fsdp2_per_stage_from_the_plan(monkeypatch, apply_order, sharded):
    fsdp = SimpleNamespace(size=lambda: 2)
    mesh = SimpleNamespace(fsdp=fsdp, dp_group="dp", dp_size=2, worker_group=None)
    part = torch.nn.Linear(2, 2)
    sync = pipeline.pipeline_sync({"apply_order": apply_order}, SimpleNamespace(), mesh, model=part)
    assert isinstance(sync, pipeline.PipelineSync)
    assert sync.sharded is sharded and sync.part is part
    assert sync.grad_scale == (2 if sharded else 1)
    # the loop's calls: it runs the pipeline itself, and a micro-batch syncs nothing
    assert sync.wrap(part) is part
    assert isinstance(sync.micro_batch(last=False), contextlib.nullcontext)
