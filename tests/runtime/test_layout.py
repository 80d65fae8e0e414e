"""fgc_runtime.mesh.layout (which ranks read which batches, checked against the launch),
fgc_runtime.parallel.parallelize (the plan's apply_order, applied in its order) and
fgc_runtime.train.check_kernel_devices (the plan's Triton kernels against the device): runtime
functions train.py calls where its template once branched on the plan. The meshes themselves run
in the multi-rank tests (test_mesh, test_tensor_parallel, test_pipeline, test_meta_init)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fgc_runtime import parallel
from fgc_runtime.errors import RunError
from fgc_runtime.mesh import Layout, layout


def _plan(trainer_type="ddp", nproc=2, mesh=None, batch=16, micro=8, pipeline=None):
    return {
        "trainer_type": trainer_type,
        "nproc": nproc,
        "mesh": {"dp": nproc} if mesh is None else mesh,
        "global_batch_size": batch,
        "micro_batch_size": micro,
        "pipeline": pipeline,
        "apply_order": [],
    }


def _dist(world_size=1, rank=0):
    return SimpleNamespace(world_size=world_size, rank=rank, distributed=world_size > 1, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "plan,world,rank,expected",
    [
        (_plan("basic", 1, {}), 1, 0, Layout(None, 0, 1, 2)),
        (_plan("ddp", 2), 2, 1, Layout(None, 1, 2, 1)),
        (_plan("ddp", 2, micro=2), 2, 0, Layout(None, 0, 2, 4)),
        # a DDP package run as one process: that process reads the whole batch
        (_plan("ddp", 2, micro=4), 1, 0, Layout(None, 0, 1, 4)),
    ],
)
def test_one_data_parallel_dimension_needs_no_mesh(plan, world, rank, expected):
    assert layout(plan, _dist(world, rank)) == expected


@pytest.mark.parametrize(
    "plan,world,message",
    [
        (
            _plan("basic", 1, {}),
            2,
            "this package was built for the basic trainer (one process): run `python train.py`, "
            "or rebuild with -D trainer_type=ddp",
        ),
        (
            _plan("pipeline", 4, {"dp": 2, "pp": 2}, pipeline={"microbatches": 2}),
            1,
            "this package runs a pipeline over 2 ranks: launch it with `torchrun --nproc-per-node 4 train.py`",
        ),
        (
            _plan("fsdp2", 4, {"dp_shard": 2, "tp": 2}),
            1,
            "this package runs on a mesh of 4 ranks: launch it with `torchrun --nproc-per-node 4 train.py`",
        ),
        (
            _plan("ddp", 2, batch=12, micro=8),
            2,
            "the global batch 12 does not split into 2 data-parallel ranks of micro-batches of 8",
        ),
    ],
)
def test_a_launch_the_plan_does_not_fit_is_a_run_error(plan, world, message):
    with pytest.raises(RunError) as info:
        layout(plan, _dist(world))
    assert str(info.value) == f"error: {message}"



def test_a_mesh_gives_the_data_parallel_place_and_a_pipeline_one_pass(monkeypatch):
    """With several dimensions or a pipeline, the plan's Mesh (here a stand-in: the real one needs
    a process group, as in test_mesh) gives the data-parallel rank and size; a pipeline's step
    is one pass of the loop (its schedule makes the micro-batches), and its batch must split
    into the pipelines' micro-batches."""
    from fgc_runtime import mesh as mesh_module

    class FakeMesh:
        def __init__(self, device, dims):
            self.dims, self.dp_rank, self.dp_size = dims, 1, 2

    monkeypatch.setattr(mesh_module, "Mesh", FakeMesh)
    pipeline = _plan("pipeline", 4, {"dp": 2, "pp": 2}, batch=16, micro=4, pipeline={"microbatches": 2})
    got = layout(pipeline, _dist(4))
    assert (got.mesh.dims, got.dp_rank, got.dp_size, got.grad_accum_steps) == ({"dp": 2, "pp": 2}, 1, 2, 1)
    hsdp = _plan("fsdp2", 4, {"dp_replicate": 2, "dp_shard": 2}, batch=16, micro=2)
    assert layout(hsdp, _dist(4))[1:] == (1, 2, 4)
    with pytest.raises(RunError) as info:
        layout({**pipeline, "global_batch_size": 6}, _dist(4))
    assert str(info.value) == "error: the global batch 6 does not split into 2 pipelines of 2 micro-batches"

class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def decoder_layers(self):
        return self.layers

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_parallelize_applies_the_plans_steps_in_order_with_their_options(monkeypatch):
    calls = []
    for name in ("tensor parallel", "activation checkpointing", "fsdp2"):
        step = parallel.STEPS[name]
        monkeypatch.setitem(
            parallel.STEPS,
            name,
            parallel.Step(lambda model, dist, mesh, _name=name, **options: calls.append((_name, mesh, options)), step.options),
        )
    plan = {"apply_order": ["tensor parallel", "activation checkpointing", "fsdp2", "pipeline stages"], "pipeline": None}
    model, mesh = _Model(), object()
    parallel.parallelize(
        model, plan, _dist(), mesh, activation_checkpointing="full", every_n_layers=2, reshard_after_forward=False,
        root=model, compile_mode=None,  # an option of a step the plan does not take is not passed on
    )
    assert calls == [
        ("tensor parallel", mesh, {}),
        ("activation checkpointing", mesh, {"activation_checkpointing": "full", "every_n_layers": 2}),
        ("fsdp2", mesh, {"reshard_after_forward": False, "root": model}),
    ]


def test_parallelize_checkpoints_the_layers_the_options_name():
    model = _Model()
    x = torch.randn(2, 4, requires_grad=True)
    reference = model(x).sum()
    parallel.parallelize(
        model, {"apply_order": ["activation checkpointing"], "pipeline": None}, _dist(), None,
        activation_checkpointing="full", every_n_layers=2,
    )
    # layers 0 and 2 wrapped (every second), the values unchanged
    assert ["forward" in vars(layer) for layer in model.layers] == [True, False, True]
    assert torch.equal(model(x).sum(), reference)
    # FSDP2 in one process shards nothing; a step without its options is a package its runtime does not fit
    parallel.parallelize(model, {"apply_order": ["fsdp2"], "pipeline": None}, _dist(), None, reshard_after_forward=True, root=model)
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
    with pytest.raises(KeyError):
        parallel.parallelize(model, {"apply_order": ["compile"], "pipeline": None}, _dist(), None)


def test_a_plan_that_runs_triton_kernels_is_checked_against_the_device(monkeypatch):
    from fgc_runtime.train import check_kernel_devices

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch_only = {"rms_norm": {"impl": "torch", "reason": "auto"}, "cross_entropy": {"impl": "chunked", "reason": "auto"}}
    assert check_kernel_devices(torch_only, torch.device("cpu")) is None
    chosen = {**torch_only, "swiglu": {"impl": "triton", "reason": "-D kernel_impl=triton"}, "rope": {"impl": "mixed", "reason": ""}}
    with pytest.raises(RunError) as info:
        check_kernel_devices(chosen, torch.device("cpu"))
    assert str(info.value).startswith(
        "error: the package's Triton kernels (rope, swiglu; rebuild with -D kernel_impl=auto and -D loss_impl=auto "
        "to run the torch code): impl='triton' "
    )
