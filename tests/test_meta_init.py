"""Sharded trainers build the model on the meta device: each rank allocates only its shards and
gives them the values the whole model would have (CausalLM.init_weights draws each parameter
from a generator seeded by its name). Two gloo ranks inside pytest; the pipeline trainer's
stages are tested in tests/test_pipeline.py."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import EXAMPLE, run_fgc


def _worker(rank, port, package, mode, results, weights=None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, package)
    from model import build_model

    from fgc_runtime.distributed import init_distributed, shutdown
    from fgc_runtime.mesh import Mesh
    from fgc_runtime.parallel import parallelize

    info = init_distributed("cpu")
    torch.manual_seed(3)
    whole = dict(build_model().named_parameters())
    torch.manual_seed(3)
    model = build_model(device="meta")
    # what train.py runs: parallelize shards the meta model, allocates each rank's shards,
    # initialises them and (pretrained) reads the rank's shards of the weights
    if mode == "fsdp2+tp":
        plan, mesh = {"apply_order": ["tensor parallel", "fsdp2"], "pipeline": None}, Mesh(info.device, {"dp_shard": 1, "tp": 2})
    else:
        plan, mesh = {"apply_order": ["fsdp2"], "pipeline": None}, None
    read = []
    if weights:  # pretrained: every rank reads the weights into its shards
        from fgc_runtime import safetensors

        get = safetensors.SafetensorsFile.get
        safetensors.SafetensorsFile.get = lambda self, name: read.append(name) or get(self, name)
        whole = {n: t.float() for n, t in safetensors.load_dir(weights).items()}
    parallelize(model, plan, info, mesh, reshard_after_forward=True, root=model, weights=weights)
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    results[rank] = {
        "local": sum(local.values()),
        "whole": sum(p.numel() for p in whole.values()),
        "equal": sorted(n for n, t in full.items() if torch.equal(t, whole[n])),
        "names": sorted(whole),
        "split": sum(
            p.numel() for n, p in whole.items() if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        ),
        "rotary": torch.equal(model.model.positions.inv_freq, build_model().model.positions.inv_freq),
        "read": sorted(set(read)),
    }
    shutdown(info)


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2+tp"])
def test_each_rank_allocates_its_shards_with_the_whole_models_values(tmp_path, mode):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=fsdp2", check=True)
    train = (out / "train.py").read_text()
    assert 'model = build_model(device="meta")' in train
    # parallelize (fgc_runtime/parallel.py) shards the meta model, then allocates and initialises it
    assert "Only then does each rank allocate its shards" in " ".join(train.replace("#", " ").split())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(port, str(out), mode, results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        r = results[rank]
        assert r["equal"] == r["names"]  # every parameter: the whole model's values
        assert r["rotary"]
        if mode == "fsdp2":  # each rank holds its half of every tensor (rank 0 the larger of uneven halves)
            assert r["local"] <= r["whole"] // 2 + 1000, (r["local"], r["whole"])
        else:  # the tp=2 mesh splits the projections; on a dp_shard of 1, FSDP2 keeps the rest whole
            assert r["local"] == r["whole"] - r["split"] // 2
    if mode == "fsdp2":
        assert results[0]["local"] + results[1]["local"] == results[0]["whole"]


def test_a_part_of_the_users_own_or_the_ddp_trainer_build_the_whole_model(tmp_path):
    """The meta build needs every part of the model to be the library's (init_weights knows how
    to initialise them; a user's part could hold a parameter it does not know): a model with
    the user's own MLP, and the DDP trainer, build the model whole, as before."""
    out = tmp_path / "ddp"
    run_fgc("build", EXAMPLE, "-o", out, check=True)
    assert "model = build_model(device=dist.device)" in (out / "train.py").read_text()
    assert "init_weights" not in (out / "train.py").read_text()

    (tmp_path / "my_mlp.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class ScaledMLP(nn.Module):\n"
        "    def __init__(self, hidden_size):\n"
        "        super().__init__()\n"
        "        self.proj = nn.Linear(hidden_size, hidden_size)\n"
        "        self.scale = nn.Parameter(torch.full((hidden_size,), 0.5))\n\n"
        "    def forward(self, x):\n"
        "        return self.proj(x) * self.scale\n"
    )
    cfg = tmp_path / "own.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[mlp]\n.mlp: &mlp !partial:.my_mlp:ScaledMLP@mlp_factory\n"
        "[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n    data_dir: tokens\n"
    )
    own = tmp_path / "own"
    proc = run_fgc("build", cfg, "-o", own, "-D", "trainer_type=fsdp2")
    assert proc.returncode == 0, proc.stderr
    train = (own / "train.py").read_text()
    assert "model = build_model(device=dist.device)" in train
    assert "init_weights" not in train and 'device="meta"' not in train


def test_pretrained_weights_load_into_each_ranks_shards(tmp_path):
    """FSDP2 x TP from pretrained weights: each rank copies its shards of the file's tensors."""
    from fgc_runtime import safetensors

    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=fsdp2", check=True)
    sys.path.insert(0, str(out))
    try:
        from model import build_model

        torch.manual_seed(11)  # other weights than the seed the ranks initialise with
        source = build_model()
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("model", None)
    weights = tmp_path / "weights"
    weights.mkdir()
    safetensors.save_file({n: t.detach() for n, t in source.state_dict().items()}, weights / "model.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _worker, args=(port, str(out), "fsdp2+tp", results, str(weights)), nprocs=2, join=True, start_method="spawn"
        )
        results = dict(results)
    for rank in (0, 1):
        r = results[rank]
        assert r["equal"] == r["names"]  # every parameter: the file's values
        assert r["read"] == sorted(source.state_dict())


def test_a_pipeline_stage_reads_only_its_tensors_of_the_weights(tmp_path, monkeypatch):
    """load_weights skips what stays on the meta device: a rank of a pipeline reads its stages'
    tensors from the files and nothing else."""
    from fgc_runtime import safetensors
    from fgc_runtime.hf import load_weights

    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=pipeline", check=True)
    sys.path.insert(0, str(out))
    sys.modules.pop("model", None)
    try:
        from model import build_model
    finally:  # the next test's `model` is another package's
        sys.path.remove(str(out))
        sys.modules.pop("model", None)

    torch.manual_seed(11)
    source = build_model()
    weights = tmp_path / "weights"
    weights.mkdir()
    safetensors.save_file({n: t.detach() for n, t in source.state_dict().items()}, weights / "model.safetensors")
    model = build_model(device="meta")
    model.model.layers[1].to_empty(device="cpu")
    model.model.positions.to_empty(device="cpu")
    model.init_weights()
    read = []
    get = safetensors.SafetensorsFile.get
    monkeypatch.setattr(safetensors.SafetensorsFile, "get", lambda self, name: read.append(name) or get(self, name))
    load_weights(model, weights)
    assert sorted(read) == sorted(n for n in source.state_dict() if n.startswith("model.layers.1."))
    for name, value in model.state_dict().items():
        if not value.is_meta:
            assert torch.equal(value, source.state_dict()[name]), name
