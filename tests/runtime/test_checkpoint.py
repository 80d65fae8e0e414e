"""Checkpoints: atomic layout, `latest`, retention, and `--resume` resolution."""

import json
import random

import pytest
import torch

from fgc_runtime.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fgc_runtime.errors import RunError


def make_state(step):
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = {
        "step": step,
        "tokens": 100 * step,
        "data_position": step,
        "config_hash": "abc123",
        "scheduler": sched.state_dict(),
    }
    return model, opt, trainer


def save(out, step, **kw):
    model, opt, trainer = make_state(step)
    return save_checkpoint(
        out,
        step=step,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state=trainer,
        **kw,
    )


def test_round_trip(tmp_path):
    model, opt, trainer = make_state(100)
    random.seed(11)
    torch.manual_seed(12)
    path = save_checkpoint(
        tmp_path,
        step=100,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state=trainer,
    )
    after_save = (
        random.random(),
        torch.rand(3),
    )  # what the RNGs give right after saving

    assert path == tmp_path / "checkpoints" / "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.pt",
        "optimizer.pt",
        "rng-rank0.pt",
        "trainer_state.pt",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 100
    assert manifest["config_hash"] == "abc123"
    assert manifest["files"] == [
        "model.pt",
        "optimizer.pt",
        "trainer_state.pt",
        "rng-rank0.pt",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000100"
    assert find_checkpoint(tmp_path) == path
    assert not [
        p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")
    ]

    loaded = load_checkpoint(path)
    assert set(loaded) >= {"model", "optimizer", "trainer_state", "rng"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert (
        loaded["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    )
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"],
        opt.state_dict()["state"][0]["exp_avg"],
    )
    assert loaded["trainer_state"]["tokens"] == 10000
    assert loaded["trainer_state"]["scheduler"] == trainer["scheduler"]

    random.seed(0)
    torch.manual_seed(0)
    set_rng_state(loaded["rng"])
    assert random.random() == after_save[0]
    assert torch.equal(torch.rand(3), after_save[1])


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), torch.randn(2))
    set_rng_state(state)
    b = (random.random(), torch.randn(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_incomplete_checkpoint(tmp_path):
    save(tmp_path, 100)
    # a newer step dir without a manifest (as if copied in half-way) and a stale tmp dir
    broken = tmp_path / "checkpoints" / "step-00000200"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000200\n")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000100"
    assert (
        resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step-00000100"
    )
    with pytest.raises(RunError) as info:
        resolve_resume(str(broken), tmp_path)
    assert info.value.path == str(broken)
    assert "no manifest.json" in info.value.message
    with pytest.raises(RunError):
        load_checkpoint(broken)


def test_latest_fallback_scan(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000200"


def test_stale_tmp_removed(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-00000050"
    stale.mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"junk")
    assert find_checkpoint(tmp_path) is None
    save(tmp_path, 100)
    assert not stale.exists()


def test_resave_same_step(tmp_path):
    save(tmp_path, 100)
    path = save(tmp_path, 100)
    assert path.is_dir() and (path / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000100",
    ]


def test_retention_keeps_newest(tmp_path):
    for step in (100, 200, 300, 400):
        save(tmp_path, step, keep_last_n=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000300", "step-00000400"]
    save(tmp_path, 500, keep_last_n=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000500",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000500\n"


def test_retention_after_resume_from_older(tmp_path):
    # resumed from step 100 and saved step 150 while step 200 exists: 150 (just saved) survives
    for step in (100, 200):
        save(tmp_path, step)
    save(tmp_path, 150, keep_last_n=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000150" in names and "step-00000200" in names
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000150"


def test_resolve_resume(tmp_path):
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet
    path = save(tmp_path, 100)
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) == path
    assert resolve_resume(str(path), tmp_path / "elsewhere") == path
    missing = tmp_path / "checkpoints" / "step-00009999"
    with pytest.raises(RunError) as info:
        resolve_resume(str(missing), tmp_path)
    assert str(info.value) == f"{missing}: error: no such checkpoint"


def test_multi_rank_files_with_barrier(tmp_path):
    # two ranks simulated in one process: rank 1's phases run at rank 0's barriers
    model, opt, trainer = make_state(7)
    calls = []

    def barrier():
        calls.append(len(calls))
        if (
            len(calls) == 1
        ):  # after rank 0 created the tmp dir, rank 1 writes its RNG file
            torch.save(
                rng_state(),
                tmp_path / "checkpoints" / ".tmp-step-00000007" / "rng-rank1.pt",
            )

    path = save_checkpoint(
        tmp_path,
        step=7,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state=trainer,
        rank=0,
        world_size=2,
        barrier=barrier,
    )
    assert len(calls) == 3
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["files"][-2:] == ["rng-rank0.pt", "rng-rank1.pt"]
    assert load_checkpoint(path, rank=1)["rng"] is not None
    assert load_checkpoint(path, rank=2)["rng"] is None
