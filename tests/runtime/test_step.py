"""fgc_runtime.step: the step's sharing over the ranks, chosen from the plan. The trainers'
exactness tests (test_e2e, test_mesh, test_diloco, test_tensor_parallel) run it end to end;
these check its choices and its one-process arithmetic against torch's own calls."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fgc_runtime.distributed import DistInfo
from fgc_runtime.checkpoint import ModelState
from fgc_runtime.parallel import ShardedState, clip_sharded_grad_norm_
from fgc_runtime.step import WORLD, step_sync
from fgc_runtime.train import autocast, grad_norm

ONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


class FakeMesh:
    dp_group, dp_size, worker_group = "dp-group", 3, "worker-group"


class FakeOuter:
    """DiLoCo's outer loop as the step sync sees it: 2 workers whose sums double each value."""

    workers = 2

    def __init__(self):
        self.steps, self.entered = [], 0

    def global_sum(self, values):
        return [2 * float(v) for v in values]

    def step(self, *, last=False):
        self.steps.append(last)

    @contextlib.contextmanager
    def global_model(self):
        self.entered += 1
        yield

    def train_state(self, model, optimizer):
        return ("diloco-state", model, optimizer)


def _model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    model(torch.randn(3, 4)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize(
    "plan, group, scale, grads, norm",
    [
        ({"trainer_type": "basic"}, WORLD, 1, None, "plain"),
        ({"trainer_type": "ddp"}, WORLD, 1, "ddp", "plain"),
        ({"trainer_type": "fsdp2"}, WORLD, 1, "fsdp", "dtensor"),
        ({"trainer_type": "ddp", "tensor_parallel": {"degree": 2}}, "dp-group", 3, "average", "sharded"),
        ({"trainer_type": "fsdp2", "tensor_parallel": {"degree": 2}}, "dp-group", 3, "fsdp", "sharded"),
        ({"trainer_type": "diloco", "diloco": {"inner": "none", "data_ranks_per_worker": 1}}, None, 1, None, "plain"),
        ({"trainer_type": "diloco", "diloco": {"inner": "ddp", "data_ranks_per_worker": 2}}, "worker-group", 2, "ddp", "plain"),
        ({"trainer_type": "diloco", "diloco": {"inner": "fsdp2", "data_ranks_per_worker": 2}}, "worker-group", 2, "fsdp", "dtensor"),
        # DiLoCo around tensor parallelism: a worker of one tensor-parallel group syncs nothing
        # itself; one of several groups averages their gradients (or FSDP2 reduces them)
        ({"trainer_type": "diloco", "tensor_parallel": {"degree": 2}, "diloco": {"inner": "none", "data_ranks_per_worker": 1}},
         None, 1, None, "sharded"),
        ({"trainer_type": "diloco", "tensor_parallel": {"degree": 2}, "diloco": {"inner": "ddp", "data_ranks_per_worker": 2}},
         "worker-group", 2, "average", "sharded"),
        ({"trainer_type": "diloco", "tensor_parallel": {"degree": 2}, "diloco": {"inner": "fsdp2", "data_ranks_per_worker": 2}},
         "worker-group", 2, "fsdp", "sharded"),
    ],
)
def test_the_plan_picks_the_groups_the_gradient_sync_and_the_norm(plan, group, scale, grads, norm):
    outer = FakeOuter() if plan["trainer_type"] == "diloco" else None
    sync = step_sync(plan, ONE, FakeMesh(), model=torch.nn.Linear(2, 2), outer=outer)
    assert (sync.group, sync.grad_scale, sync.grads, sync.norm) == (group, scale, grads, norm)


def test_a_diloco_plan_needs_its_outer_loop_and_no_other_plan_takes_one():
    with pytest.raises(ValueError, match="outer loop"):
        step_sync({"trainer_type": "diloco", "diloco": {"inner": "none"}}, ONE, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="outer loop"):
        step_sync({"trainer_type": "ddp"}, ONE, model=torch.nn.Linear(2, 2), outer=FakeOuter())


def test_without_an_outer_loop_the_totals_are_the_steps_own_and_nothing_ends_a_step():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = step_sync({"trainer_type": "ddp"}, ONE, model=model)
    loss_sum, count = torch.tensor(6.0), torch.tensor(4.0)
    totals = sync.totals(loss_sum, count, 128, 0.5)
    assert totals.loss_sum is loss_sum and totals.count is count  # nothing gathered, nothing read
    assert (totals.loss, totals.tokens, totals.norm) == (1.5, 128, 0.5)
    sync.end_step(last=True)  # no outer step to take
    assert isinstance(sync.eval_weights(), contextlib.nullcontext)
    assert type(sync.train_state(optimizer)) is ModelState
    fsdp = step_sync({"trainer_type": "fsdp2"}, ONE, model=model)
    assert type(fsdp.train_state(optimizer)) is ShardedState  # gathered full state dicts


def test_diloco_totals_are_over_the_workers_and_its_outer_loop_ends_the_step():
    model = torch.nn.Linear(2, 2)
    outer = FakeOuter()
    sync = step_sync({"trainer_type": "diloco", "diloco": {"inner": "none"}}, ONE, model=model, outer=outer)
    totals = sync.totals(torch.tensor(6.0), torch.tensor(4.0), 128, 0.5)
    # summed over the 2 workers; the norm their mean
    assert (totals.loss_sum, totals.count, totals.tokens, totals.norm) == (12.0, 8.0, 256, 0.5)
    assert totals.loss == 1.5
    assert sync.aux_mean(torch.tensor(0.25)) == 0.25  # the mean over the workers
    sync.end_step(last=False)
    sync.end_step(last=True)
    assert outer.steps == [False, True]
    with sync.eval_weights():
        assert outer.entered == 1  # the global parameters for evaluation and samples
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sync.train_state(optimizer) == ("diloco-state", model, optimizer)


def test_the_pipeline_has_no_step_sync():
    with pytest.raises(ValueError, match="schedule"):
        step_sync({"trainer_type": "pipeline"}, ONE, model=torch.nn.Linear(2, 2))


def test_one_process_runs_the_model_itself_and_sums_nothing():
    model = torch.nn.Linear(2, 2)
    sync = step_sync({"trainer_type": "ddp"}, ONE, model=model)
    assert sync.wrap(model) is model  # no DDP wrapper in one process
    n = torch.tensor(7.0)
    assert sync.count(n) is n and n.item() == 7.0
    assert isinstance(sync.micro_batch(last=False), contextlib.nullcontext)
    assert sync.aux_mean(torch.tensor(0.5)) == 0.5


@pytest.mark.parametrize("max_norm", [None, 0.1])
def test_the_norm_is_torchs(max_norm):
    expected_model = _model_with_grads()
    if max_norm is None:
        expected = grad_norm(expected_model.parameters())
    else:
        expected = torch.nn.utils.clip_grad_norm_(expected_model.parameters(), max_norm).item()
    model = _model_with_grads()
    norm = step_sync({"trainer_type": "basic"}, ONE, model=model).clip_grad_norm(max_norm)
    assert norm == expected
    for p, q in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(p.grad, q.grad)  # clipped (or not) alike


def test_autocast_only_for_the_mixed_precisions():
    device = torch.device("cpu")
    for precision in ("fp32", "bf16"):
        assert isinstance(autocast(precision, device), contextlib.nullcontext)
    with autocast("bf16-mixed", device):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("max_norm", [0.1, 1e9])
def test_the_sharded_norm_clips_the_gradients_as_torch_does(max_norm):
    """The tensor-parallel norm (``sharded``) scales the parameters' gradients by the clip
    coefficient, as torch's clip_grad_norm_ does (it once passed the gradients to torch's
    clip_grads_with_norm_, which reads their .grad: nothing was clipped)."""
    expected_model = _model_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(expected_model.parameters(), max_norm).item()
    model = _model_with_grads()
    norm = clip_sharded_grad_norm_(model, max_norm)
    assert norm == pytest.approx(expected, rel=1e-6)
    for p, q in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    if max_norm < expected:  # clipped: the new norm is max_norm
        assert grad_norm(model.parameters()) == pytest.approx(max_norm, rel=1e-5)
