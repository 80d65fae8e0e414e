"""The DiLoCo trainer (`trainer_type=diloco`): build-time rules at their config lines, the plan and
the specialised train.py, a 2-worker run against an independent single-process simulation, a stop
in the middle of a round that resumes bitwise, and a resume with another number of workers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLE, REPO, line_of, run_fgc, small_config

ENV = dict(os.environ, OMP_NUM_THREADS="1")

# -- build-time rules --------------------------------------------------------------------------------


def _config(tmp_path: Path, meta: str = "", extra: str = "") -> Path:
    """A small DiLoCo config (see conftest.small_config)."""
    return small_config(tmp_path, '-- set ns.trainer_type = "diloco"\n' + meta, extra)


def test_outer_loop_rules_are_errors_at_their_lines(tmp_path):
    path = _config(
        tmp_path,
        extra="[diloco]\n.diloco: &diloco !singleton:fgc.settings:DiLoCoSettings@diloco\n"
        "    inner_steps: 0\n    outer_lr: 0.0\n    outer_momentum: 1.0\n",
    )
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    # independent errors, all reported, each at the line of its value
    assert f"cfg.yaml:{line_of(path, 'inner_steps: 0')}: error: inner_steps must be at least 1, got 0" in proc.stderr
    assert f"cfg.yaml:{line_of(path, 'outer_lr: 0.0')}: error: outer_lr must be more than 0, got 0.0" in proc.stderr
    assert (
        f"cfg.yaml:{line_of(path, 'outer_momentum: 1.0')}: error: outer_momentum must be 0 or more and less than 1, got 1.0"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "meta,knob,message",
    [
        # a knob set in the child's [config_metadata] wins over the library default, and the hint names it
        ("-- set ns.diloco_inner_steps = diloco_inner_steps | default(-1)\n", "diloco_inner_steps",
         "error: inner_steps must be at least 1, got -1"),
        ('-- set ns.precision = "fp16-mixed"\n', "fp16-mixed", "error: fp16-mixed is not supported with DiLoCo"),
        ("-- set ns.grad_clip = none\n-- set ns.optimizer_in_backward = true\n", "optimizer_in_backward",
         "error: optimizer_in_backward cannot be combined with the diloco trainer"),
    ],
)
def test_unsupported_settings_are_errors_naming_the_usersline_of(tmp_path, meta, knob, message):
    path = _config(tmp_path, meta)
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert f"cfg.yaml:{line_of(path, knob)}" in proc.stderr  # the hint: the line that set it


# -- training ----------------------------------------------------------------------------------------

H = 3
STEPS = 6
# Weights of two layouts of one run (workers of one rank against workers of pipelines, of FSDP2
# or tensor-parallel ranks) sum in different orders, so they agree to float noise, not bitwise:
# on an AMD EPYC one weight of 24,576 ends 1.8e-6 apart after STEPS steps (runs of one layout,
# stopped and resumed, are compared bitwise).
WEIGHT_ATOL = 1e-5
# small and quick; micro_batch_size 4 gives each worker two micro-batches a step
KNOBS = ["-D", "trainer_type=diloco", "-D", f"diloco_inner_steps={H}", "-D", "diloco_outer_lr=0.7",
         "-D", f"max_steps={STEPS}", "-D", "num_hidden_layers=2", "-D", "eval_every=0",
         "-D", "micro_batch_size=4", "-D", "lr_scheduler=constant", "-D", "warmup_steps=0"]


def _torchrun(pkg: Path, run: Path, *flags, script=None, nproc=2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += [str(script), str(pkg)] if script else [str(pkg / "train.py")]
    cmd += ["--output-dir", str(run), "--log-every", "1", *map(str, flags)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=run.parent)


def _losses(run: Path) -> dict[int, float]:
    """The loss of each step (the last one logged: a resumed run logs its steps again)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """The package the training tests run."""
    out = tmp_path_factory.mktemp("diloco") / "pkg"
    run_fgc("build", EXAMPLE, "-o", out, *KNOBS, check=True)
    return out


@pytest.fixture(scope="module")
def full(pkg):
    """The package, and its uninterrupted 2-worker run."""
    run = pkg.parent / "full"
    proc = _torchrun(pkg, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pkg, run


def test_plan_constants_and_explain(pkg):
    out = pkg
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert plan["trainer_type"] == "diloco" and plan["launcher"] == "torchrun"
    assert plan["diloco"] == {
        "workers": 2,
        "ranks_per_worker": 1,
        "data_ranks_per_worker": 1,
        "tensor_degree": 1,
        "pipeline_degree": 1,
        "replicate_degree": 1,
        "inner": "none",
        "inner_steps": 3,
        "outer_optimizer": "SGD with Nesterov momentum",
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        "loss_normalisation": "per worker (no gradient sync between rounds)",
    }
    train = (out / "train.py").read_text()
    assert "DILOCO_INNER_STEPS = 3  # -D diloco_inner_steps=3 (<fgc>/lm/train.yaml:" in train
    assert "DILOCO_OUTER_LR = 0.7  # -D diloco_outer_lr=0.7 (<fgc>/lm/train.yaml:" in train
    assert re.search(r"DILOCO_OUTER_MOMENTUM = 0\.9  # <fgc>/lm/train\.yaml:\d+\n", train)
    assert "from fgc_runtime.diloco import DiLoCo\n" in train
    # the outer loop joins the step sync, which picks DiLoCo's checkpoint state and takes its outer step
    assert "sync = step_sync(PLAN, dist, mesh, model=model, fsdp_root=model, outer=diloco)" in train
    assert "train_state = sync.train_state(optimizer)" in train
    assert "sync.end_step(last=step == args.max_steps)" in train
    assert "DistributedDataParallel" not in train  # no gradient all-reduce
    assert (out / "fgc_runtime" / "diloco.py").is_file()
    # the other trainers carry no DiLoCo code (the golden package is the ddp trainer)
    assert "diloco" not in (REPO / "golden" / "tiny_llama" / "train.py").read_text().lower()
    explain = run_fgc("explain", EXAMPLE, *KNOBS)
    assert explain.returncode == 0, explain.stderr
    assert "DiLoCo: 2 workers, each with its own optimizer, sync every 3 steps; outer optimizer SGD with Nesterov " \
           "momentum, lr 0.7, momentum 0.9, fp32" in explain.stdout
    assert re.search(r"outer \(DiLoCo\) +1\.9 MiB", explain.stdout)  # 8 bytes x 252,576 parameters


def _simulate(pkg: Path, steps: int):
    """DiLoCo written out in one process: two model copies with two AdamWs, each on its rank's
    shard of the batch, and every H steps the average of (global - local) as the gradient of a torch
    SGD with Nesterov momentum over fp32 global parameters, copied back into both models."""
    from fgc_runtime.data import BatchSampler, TokenShard

    spec = importlib.util.spec_from_file_location("diloco_test_model", pkg / "model.py")
    model_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_module)
    workers, optimizers, samplers = [], [], []
    shard = TokenShard.open(pkg / "data", "train")
    for rank in range(2):
        torch.manual_seed(42)  # the trainer seeds every rank alike: the same initial weights
        model = model_module.build_model()
        no_decay = [p for n, p in model.named_parameters() if re.search("norm|bias|embed", n)]
        decay = [p for n, p in model.named_parameters() if not re.search("norm|bias|embed", n)]
        optimizers.append(torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95),
            weight_decay=0.1,
        ))
        samplers.append(BatchSampler(shard, seq_len=128, global_batch_size=16, seed=42, rank=rank, world_size=2))
        workers.append(model)
    names = [n for n, _ in workers[0].named_parameters()]
    outer = [p.detach().clone().float() for p in workers[0].parameters()]
    outer_opt = torch.optim.SGD(outer, lr=0.7, momentum=0.9, nesterov=True)
    losses = []
    for step in range(1, steps + 1):
        total, count = 0.0, 0
        for model, opt, sampler in zip(workers, optimizers, samplers):
            input_ids, labels = sampler.batch(step - 1)
            logits = model(input_ids)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
            n = int((labels != -100).sum())
            (loss_sum / n).backward()  # this worker's own target count
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            total, count = total + loss_sum.item(), count + n
        losses.append(total / count)
        if step % H == 0 or step == steps:
            with torch.no_grad():
                for i, g in enumerate(outer):
                    local = [list(m.parameters())[i].float() for m in workers]
                    g.grad = ((g - local[0]) + (g - local[1])) / 2
                outer_opt.step()
                for model in workers:
                    for p, g in zip(model.parameters(), outer):
                        p.copy_(g)
    return losses, dict(zip(names, outer))


@pytest.mark.slow
def test_two_workers_match_an_independent_simulation(full):
    pkg, run = full
    losses = _losses(run)
    want, global_params = _simulate(pkg, STEPS)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(want, rel=1e-6)
    # the final checkpoint's model (what final/ exports) is the global model after the last sync
    saved = _load(run / "checkpoints" / f"step-{STEPS:08d}" / "model.pt")
    for name, value in global_params.items():
        # (two micro-batches against one whole batch: an element or two differ by a few 1e-6,
        # where AdamW divides by a tiny second moment)
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-5)
    # after that sync every worker holds the global model
    for rank in (0, 1):
        mine = _load(run / "checkpoints" / f"step-{STEPS:08d}" / f"state-rank{rank}.pt")["model"]
        assert all(torch.equal(mine[n], saved[n]) for n in global_params)
    assert (run / "final" / "config.json").is_file()
    # the logged loss is the global one, the grad norm the workers' mean: one line a step
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] == r["step"] * 16 * 128 for r in records)


# rank 1 gets a SIGTERM as it fetches the batch of step 4: every rank stops after step 4, mid-round
SIGTERM_AT_STEP_4 = """\
import os, runpy, signal, sys
build = sys.argv[1]
sys.path.insert(0, build)
import fgc_runtime.data as data
original = data.BatchSampler.batch
def batch(self, index):
    if os.environ.get("RANK") == "1" and index == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, index)
data.BatchSampler.batch = batch
sys.argv = [os.path.join(build, "train.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_stop_mid_round_resumes_bitwise_and_another_world_size_is_an_error(full, tmp_path):
    pkg, full_run = full
    script = tmp_path / "stop.py"
    script.write_text(SIGTERM_AT_STEP_4)
    run = tmp_path / "run"
    stopped = _torchrun(pkg, run, script=script)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    saved = run / "checkpoints" / "step-00000004"
    files = json.loads((saved / "manifest.json").read_text())["files"]
    assert "state-rank0.pt" in files and "state-rank1.pt" in files
    assert _load(saved / "optimizer.pt")["inner_step"] == 1  # one step into the second round
    # between syncs the workers' models differ
    local = [_load(saved / f"state-rank{r}.pt")["model"] for r in (0, 1)]
    assert not torch.equal(local[0]["lm_head.weight"], local[1]["lm_head.weight"])

    # one process cannot take over two workers' states: a one-line error naming both sizes
    wrong = subprocess.run([sys.executable, str(pkg / "train.py"), "--output-dir", str(run)],
                           capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"{saved}: error: this DiLoCo checkpoint was written by 2 ranks, and this run has 1: each worker's own "
        "model and inner optimizer are in it, so resume with 2 processes"
    ]

    resumed = _torchrun(pkg, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert _losses(run) == _losses(full_run)  # bitwise
    end = f"step-{STEPS:08d}"
    a = _load(run / "checkpoints" / end / "model.pt")
    b = _load(full_run / "checkpoints" / end / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["ddp", "fsdp2"])
def test_workers_of_two_ranks_match_workers_of_one_rank_and_resume_bitwise(full, tmp_path, inner):
    """DiLoCo around DDP or FSDP2: 4 ranks as 2 workers of 2. Each worker reads the rows a
    one-rank worker reads, split over its ranks, so the run is the 2-worker run's; it resumes
    bitwise mid-round, and a package with another number of workers refuses its checkpoint."""
    _, two_run = full
    pkg = tmp_path / "pkg"
    flags = ["-D", "nproc=4", "-D", "diloco_workers=2"] + (["-D", "diloco_fsdp=true"] if inner == "fsdp2" else [])
    run_fgc("build", EXAMPLE, "-o", pkg, *KNOBS, *flags, check=True)
    plan = _plan(pkg)
    assert plan["mesh"] == {"diloco": 2, "dp": 2} if inner == "ddp" else {"diloco": 2, "dp_shard": 2}
    assert plan["diloco"]["inner"] == inner and plan["diloco"]["ranks_per_worker"] == 2
    full_run = tmp_path / "full"
    proc = _torchrun(pkg, full_run, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the loss, the workers' mean grad norm, the token count and the model: the 2-worker run's
    a, b = _assert_same_run(full_run, two_run)
    end = f"step-{STEPS:08d}"
    outer_a = _load(full_run / "checkpoints" / end / "optimizer.pt")["outer_params"]
    outer_b = _load(two_run / "checkpoints" / end / "optimizer.pt")["outer_params"]
    for name in outer_b:
        torch.testing.assert_close(outer_a[name], outer_b[name], rtol=1e-5, atol=WEIGHT_ATOL)
    assert (full_run / "final" / "config.json").is_file()

    script = tmp_path / "stop.py"
    script.write_text(SIGTERM_AT_STEP_4)
    run = tmp_path / "run"
    stopped = _torchrun(pkg, run, script=script, nproc=4)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    saved = run / "checkpoints" / "step-00000004"
    assert _load(saved / "optimizer.pt")["workers"] == 2
    local = [_load(saved / f"state-rank{r}.pt")["model"]["lm_head.weight"] for r in range(4)]
    if inner == "ddp":  # mid-round, the ranks of one worker hold the same model
        assert torch.equal(local[0], local[1]) and torch.equal(local[2], local[3])
    else:  # each rank of a worker holds its own shard: half the rows
        assert local[0].shape[0] == (b["lm_head.weight"].shape[0] + 1) // 2
    assert not torch.equal(local[0], local[2])  # the two workers' models differ between syncs

    # 4 workers of one rank cannot take over 2 workers' states
    other = tmp_path / "other"
    run_fgc("build", EXAMPLE, "-o", other, *KNOBS, "-D", "nproc=4", check=True)
    wrong = _torchrun(other, run, nproc=4)
    assert wrong.returncode != 0
    assert (
        f"{saved}: error: this DiLoCo checkpoint was written by 2 workers, and this run has 4: each worker's own "
        "model and inner optimizer are in it, so resume with a package built with -D diloco_workers=2"
    ) in wrong.stderr

    resumed = _torchrun(pkg, run, nproc=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert _losses(run) == _losses(full_run)  # bitwise
    a = _load(run / "checkpoints" / end / "model.pt")
    b = _load(full_run / "checkpoints" / end / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def _plan(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["plan"]


@pytest.mark.slow
def test_one_worker_with_outer_lr_1_and_no_momentum_is_plain_training(tmp_path):
    """With one worker, outer_lr 1 and outer_momentum 0, a sync sets the global model to the local
    one: DiLoCo is then the basic trainer (to rounding)."""
    knobs = ["-D", "max_steps=3", "-D", "num_hidden_layers=1", "-D", "seq_len=32", "-D", "eval_every=0"]
    basic, single = tmp_path / "basic", tmp_path / "single"
    run_fgc("build", EXAMPLE, "-o", basic, *knobs, "-D", "trainer_type=basic", check=True)
    run_fgc("build", EXAMPLE, "-o", single, *knobs, "-D", "trainer_type=diloco", "-D", "diloco_inner_steps=2",
            "-D", "diloco_outer_lr=1.0", "-D", "diloco_outer_momentum=0.0", check=True)
    for pkg in (basic, single):
        proc = subprocess.run([sys.executable, str(pkg / "train.py"), "--output-dir", str(tmp_path / f"run_{pkg.name}"),
                               "--log-every", "1"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _losses(tmp_path / "run_basic"), _losses(tmp_path / "run_single")
    assert sorted(got) == [1, 2, 3]
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)

    # the basic package pointed at the DiLoCo run finds its checkpoint, whose optimizer.pt holds
    # the outer state: a one-line error, not a traceback
    wrong = subprocess.run([sys.executable, str(basic / "train.py"), "--output-dir", str(tmp_path / "run_single"),
                            "--max-steps", "4"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"{tmp_path / 'run_single' / 'checkpoints' / 'step-00000003'}: error: the checkpoint's optimizer state "
        "does not fit this run's optimizer (AdamW): 'param_groups'"
    ]


# -- DiLoCo around tensor parallelism --------------------------------------------------------------

# with the warm-up schedule (the library default); 4 micro-batches of 2 a worker
TP_KNOBS = ["-D", "trainer_type=diloco", "-D", f"diloco_inner_steps={H}", "-D", "diloco_outer_lr=0.7",
            "-D", f"max_steps={STEPS}", "-D", "num_hidden_layers=2", "-D", "eval_every=0", "-D", "micro_batch_size=2"]


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _assert_same_run(run: Path, want_run: Path) -> tuple[dict, dict]:
    """RUN logged the steps of WANT_RUN with the same tokens, losses (to 1e-6) and norms (to
    1e-5), and its last checkpoint's model.pt (whole tensors) is WANT_RUN's, to 1e-5 (the two
    layouts sum in different orders: WEIGHT_ATOL); returns the two."""
    got, want = _records(run), _records(want_run)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["tokens"] == want[step]["tokens"] == step * 16 * 128
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
    end = f"step-{STEPS:08d}"
    a, b = _load(run / "checkpoints" / end / "model.pt"), _load(want_run / "checkpoints" / end / "model.pt")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].shape == b[name].shape
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=WEIGHT_ATOL)
    return a, b


def _stop_mid_round_and_resume(pkg: Path, run: Path, final_model: dict, tmp_path: Path, nproc: int, check_saved=None) -> None:
    """A run of PKG stopped by a SIGTERM at step 4 (one step into the second round), which
    CHECK_SAVED (if given) may inspect through its checkpoint directory, then resumed: its losses
    are RUN's bitwise, and its final model.pt is FINAL_MODEL."""
    script = tmp_path / "stop.py"
    script.write_text(SIGTERM_AT_STEP_4)
    stopped_run = tmp_path / "run"
    stopped = _torchrun(pkg, stopped_run, script=script, nproc=nproc)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    saved = stopped_run / "checkpoints" / "step-00000004"
    assert _load(saved / "optimizer.pt")["inner_step"] == 1
    if check_saved is not None:
        check_saved(saved)
    resumed = _torchrun(pkg, stopped_run, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert _losses(stopped_run) == _losses(run)  # bitwise
    c = _load(stopped_run / "checkpoints" / f"step-{STEPS:08d}" / "model.pt")
    assert all(torch.equal(final_model[k], c[k]) for k in final_model)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """2 workers of one rank (no tensor parallelism), and 2 workers of a tensor-parallel group of 2
    ranks (4 ranks: mesh diloco 2 x tp 2): their packages and uninterrupted runs."""
    root = tmp_path_factory.mktemp("diloco_tp")
    runs = {}
    for name, flags, nproc in (("plain", [], 2), ("tp", ["-D", "nproc=4", "-D", "diloco_workers=2", "-D", "tensor_degree=2"], 4)):
        pkg = root / f"pkg_{name}"
        run_fgc("build", EXAMPLE, "-o", pkg, *TP_KNOBS, *flags, check=True)
        proc = _torchrun(pkg, root / f"run_{name}", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (pkg, root / f"run_{name}")
    return runs


@pytest.mark.slow
def test_workers_of_a_tensor_parallel_group_match_workers_of_one_rank_and_resume_bitwise(tp_runs, tmp_path):
    """DiLoCo around tensor parallelism: each worker's projections split over 2 ranks. Its losses,
    norms and token counts are those of workers of one rank, through two syncs (gradient clipping
    included: the tensor-parallel norm once measured without clipping, and the runs drifted
    apart by 1e-3 in 6 steps); its checkpoints gather the workers' shards, and a stop mid-round
    resumes bitwise."""
    pkg, run = tp_runs["tp"]
    _, plain_run = tp_runs["plain"]
    plan = _plan(pkg)
    assert plan["mesh"] == {"diloco": 2, "tp": 2}
    assert plan["diloco"]["inner"] == "none" and plan["diloco"]["data_ranks_per_worker"] == 1
    assert plan["diloco"]["ranks_per_worker"] == 2 and plan["tensor_parallel"]["degree"] == 2
    a, b = _assert_same_run(run, plain_run)
    end = run / "checkpoints" / f"step-{STEPS:08d}"
    # each rank's own state is its shard: q_proj splits its output rows over the 2 ranks
    q = "model.layers.0.self_attn.q_proj.weight"
    own = _load(end / "state-rank1.pt")["model"][q]
    assert own.shape[0] * 2 == b[q].shape[0]
    assert (run / "final" / "config.json").is_file()

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=4)


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["ddp", "fsdp2"])
def test_workers_of_two_tensor_parallel_groups_match_workers_of_one_and_resume_bitwise(tp_runs, tmp_path, inner):
    """8 ranks as 2 workers of 2 data-parallel groups x 2 tensor-parallel ranks (the groups average
    their gradients, or shard with FSDP2): each worker reads the rows a one-group worker reads,
    split over its groups, so the run is the 4-rank tensor-parallel run's; a stop mid-round
    resumes bitwise."""
    _, want_run = tp_runs["tp"]
    pkg = tmp_path / "pkg"
    flags = ["-D", "nproc=8", "-D", "diloco_workers=2", "-D", "tensor_degree=2"]
    run_fgc("build", EXAMPLE, "-o", pkg, *TP_KNOBS, *flags, *(["-D", "diloco_fsdp=true"] if inner == "fsdp2" else []),
            check=True)
    dp = "dp" if inner == "ddp" else "dp_shard"
    assert _plan(pkg)["mesh"] == {"diloco": 2, dp: 2, "tp": 2}
    run = tmp_path / "full"
    proc = _torchrun(pkg, run, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _assert_same_run(run, want_run)

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=8)


def test_tensor_parallel_workers_are_planned_and_a_degree_that_does_not_divide_a_worker_is_an_error(tmp_path):
    # by default a worker is one tensor-parallel group
    proc = run_fgc("explain", EXAMPLE, "-D", "trainer_type=diloco", "-D", "nproc=4", "-D", "tensor_degree=2")
    assert proc.returncode == 0, proc.stderr
    assert "mesh: diloco=2 x tp=2" in proc.stdout
    assert "DiLoCo: 2 workers of 2 ranks (tensor parallel over 2 ranks inside a worker)" in proc.stdout
    proc = run_fgc("explain", EXAMPLE, "-D", "trainer_type=diloco", "-D", "nproc=8", "-D", "tensor_degree=2",
                   "-D", "diloco_workers=2")
    assert proc.returncode == 0, proc.stderr
    assert "DiLoCo: 2 workers of 4 ranks (tensor parallel over 2 ranks, DDP over 2 groups inside a worker)" in proc.stdout
    proc = run_fgc("check", EXAMPLE, "-D", "trainer_type=diloco", "-D", "nproc=6", "-D", "diloco_workers=2",
                   "-D", "tensor_degree=2")
    assert proc.returncode == 2
    assert ("error: a DiLoCo worker's 3 ranks (nproc 6 / 2 workers) do not split into tensor-parallel groups "
            "of tensor_degree 2") in proc.stderr
    assert "the value was set by -D tensor_degree=2" in proc.stderr
    # FSDP2 inside a worker that is one tensor-parallel group has nothing to shard over
    proc = run_fgc("check", EXAMPLE, "-D", "trainer_type=diloco", "-D", "nproc=4", "-D", "tensor_degree=2",
                   "-D", "diloco_fsdp=true")
    assert proc.returncode == 2
    assert ("error: FSDP2 inside DiLoCo workers needs workers of 2 or more data-parallel ranks: 2 workers of "
            "nproc 4 are one tensor-parallel group of 2 ranks each") in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_hsdp_inside_workers_matches_workers_of_one_rank_and_resumes_bitwise(full, tmp_path):
    """8 ranks as 2 workers, each an HSDP copy set (-D diloco_fsdp=true -D replicate_degree=2: 2
    copies x 2 shards): each worker reads the rows a one-rank worker reads, split over its 4
    ranks, so the run is the 2-worker run's; a stop mid-round resumes bitwise."""
    _, two_run = full
    pkg = tmp_path / "pkg"
    knobs = ["micro_batch_size=2" if k == "micro_batch_size=4" else k for k in KNOBS]  # 2 rows a rank
    run_fgc("build", EXAMPLE, "-o", pkg, *knobs, "-D", "nproc=8", "-D", "diloco_workers=2", "-D", "diloco_fsdp=true",
            "-D", "replicate_degree=2", check=True)
    plan = _plan(pkg)
    assert plan["mesh"] == {"diloco": 2, "dp_replicate": 2, "dp_shard": 2}
    assert plan["diloco"]["inner"] == "fsdp2" and plan["diloco"]["replicate_degree"] == 2
    assert "hybrid" in plan["fsdp_units"]
    run = tmp_path / "full"
    proc = _torchrun(pkg, run, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _assert_same_run(run, two_run)

    def copies_and_workers(saved: Path) -> None:
        local = [_load(saved / f"state-rank{r}.pt")["model"]["lm_head.weight"] for r in (0, 2, 4)]
        # ranks 0 and 2 hold the two copies (dp_replicate) of one shard: half the rows; rank 4
        # the same shard in the other worker, which differs between syncs
        assert torch.equal(local[0], local[1]) and local[0].shape[0] == (b["lm_head.weight"].shape[0] + 1) // 2
        assert not torch.equal(local[0], local[2])

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=8, check_saved=copies_and_workers)


def test_hsdp_workers_are_planned_and_need_diloco_fsdp_and_a_dividing_degree():
    flags = ["-D", "trainer_type=diloco", "-D", "nproc=8", "-D", "diloco_workers=2"]
    proc = run_fgc("explain", EXAMPLE, *flags, "-D", "diloco_fsdp=true", "-D", "replicate_degree=2")
    assert proc.returncode == 0, proc.stderr
    assert "mesh: diloco=2 x dp_replicate=2 x dp_shard=2" in proc.stdout
    assert "DiLoCo: 2 workers of 4 ranks (HSDP inside a worker: 2 copies x 2 shards)" in proc.stdout
    proc = run_fgc("check", EXAMPLE, *flags, "-D", "diloco_fsdp=true", "-D", "replicate_degree=3")
    assert proc.returncode == 2
    assert "error: a DiLoCo worker's 4 data-parallel ranks do not split into replicate_degree 3 copies" in proc.stderr
    # without diloco_fsdp a worker runs DDP: there is nothing to shard hybridly
    proc = run_fgc("check", EXAMPLE, *flags, "-D", "replicate_degree=2")
    assert proc.returncode == 2
    assert "replicate_degree has no effect with trainer_type diloco" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- DiLoCo around a pipeline --------------------------------------------------------------------

PIPE_KNOBS = ["microbatches=2" if k == "micro_batch_size=4" else k for k in KNOBS]  # 2 micro-batches of 4


@pytest.mark.slow
def test_workers_of_a_pipeline_match_workers_of_one_rank_and_resume_bitwise(full, tmp_path):
    """DiLoCo around a pipeline (-D pipeline_degree=2): 4 ranks as 2 workers, each a pipeline of 2
    stages. The run is the 2-worker run's; the checkpoint's global model and outer state are
    merged from the stages (the outer optimizer's state by parameter name), each rank's own
    state is its stages', and a stop mid-round resumes bitwise."""
    _, two_run = full
    pkg = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", pkg, *PIPE_KNOBS, "-D", "nproc=4", "-D", "pipeline_degree=2", check=True)
    plan = _plan(pkg)
    assert plan["trainer_type"] == "diloco" and plan["mesh"] == {"diloco": 2, "dp": 1, "pp": 2}
    assert plan["diloco"]["workers"] == 2 and plan["diloco"]["pipeline_degree"] == 2
    assert len(plan["pipeline"]["stages"]) == 2
    train = (pkg / "train.py").read_text()
    assert "sync = pipeline.pipeline_sync(PLAN, dist, mesh, model=part, outer=diloco)" in train
    assert "(FSDP2 reduces the gradients)" not in train
    run = tmp_path / "full"
    proc = _torchrun(pkg, run, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _assert_same_run(run, two_run)
    end = run / "checkpoints" / f"step-{STEPS:08d}"
    outer, want_outer = _load(end / "optimizer.pt"), _load(two_run / "checkpoints" / f"step-{STEPS:08d}" / "optimizer.pt")
    assert sorted(outer["outer_params"]) == sorted(want_outer["outer_params"])
    for name, value in want_outer["outer_params"].items():
        torch.testing.assert_close(outer["outer_params"][name], value, rtol=1e-5, atol=WEIGHT_ATOL)
    # the outer momentum of every parameter, keyed by name
    assert sorted(outer["outer_optimizer"]["state"]) == sorted(want_outer["outer_params"])
    assert sorted(outer["outer_optimizer"]["param_groups"][0]["params"]) == sorted(want_outer["outer_params"])
    # rank 0 holds stage 0 (the embedding), rank 1 stage 1 (the head)
    assert "model.embed_tokens.weight" in _load(end / "state-rank0.pt")["model"]
    assert "lm_head.weight" in _load(end / "state-rank1.pt")["model"]
    assert (run / "final" / "config.json").is_file()

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=4)


@pytest.mark.slow
def test_workers_of_two_pipelines_match_workers_of_one_rank_and_resume_bitwise(full, tmp_path):
    """8 ranks as 2 workers of 2 pipelines of 2 stages (mesh diloco x dp x pp): the pipelines of
    a worker sum their targets and gradients, so the run is the 2-worker run's; a stop mid-round
    resumes bitwise."""
    _, two_run = full
    pkg = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", pkg, *PIPE_KNOBS, "-D", "nproc=8", "-D", "pipeline_degree=2",
            "-D", "diloco_workers=2", check=True)
    assert _plan(pkg)["mesh"] == {"diloco": 2, "dp": 2, "pp": 2}
    run = tmp_path / "full"
    proc = _torchrun(pkg, run, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _assert_same_run(run, two_run)

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=8)


@pytest.mark.slow
def test_workers_of_sharded_pipelines_match_workers_of_one_rank_and_resume_bitwise(full, tmp_path):
    """8 ranks as 2 workers of 2 pipelines of 2 stages, each stage sharded over its worker's 2
    pipelines by FSDP2 (-D diloco_fsdp=true: mesh diloco x dp_shard x pp). FSDP2 averages the
    pipelines' gradients where the unsharded workers sum them, so the run is the 2-worker run's;
    each rank's own state is its shards, the global model and outer state are whole, and a stop
    mid-round resumes bitwise."""
    _, two_run = full
    pkg = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", pkg, *PIPE_KNOBS, "-D", "nproc=8", "-D", "pipeline_degree=2",
            "-D", "diloco_workers=2", "-D", "diloco_fsdp=true", check=True)
    plan = _plan(pkg)
    assert plan["mesh"] == {"diloco": 2, "dp_shard": 2, "pp": 2}
    assert plan["diloco"]["inner"] == "fsdp2" and "fsdp2 per stage" in plan["apply_order"]
    train = (pkg / "train.py").read_text()
    assert "FSDP2 then shards each stage" in " ".join(train.replace("#", " ").split())
    # pipeline_sync makes FSDP2 reduce the gradients: the plan's apply_order has "fsdp2 per stage"
    assert "sync = pipeline.pipeline_sync(PLAN, dist, mesh, model=part, outer=diloco)" in train
    assert "(FSDP2 reduces the gradients) of each DiLoCo worker" in " ".join(train.replace("#", " ").split())
    run = tmp_path / "full"
    proc = _torchrun(pkg, run, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = _assert_same_run(run, two_run)
    end = run / "checkpoints" / f"step-{STEPS:08d}"
    outer = _load(end / "optimizer.pt")
    want_outer = _load(two_run / "checkpoints" / f"step-{STEPS:08d}" / "optimizer.pt")
    for name, value in want_outer["outer_params"].items():
        assert outer["outer_params"][name].shape == value.shape  # whole, not a shard
        torch.testing.assert_close(outer["outer_params"][name], value, rtol=1e-5, atol=WEIGHT_ATOL)
    # rank 0 (worker 0, first shard, stage 0) holds its half of the embedding's rows (FSDP2's
    # first shard is the larger one of an odd count)
    own = _load(end / "state-rank0.pt")["model"]["model.embed_tokens.weight"]
    assert own.shape[0] == (a["model.embed_tokens.weight"].shape[0] + 1) // 2

    _stop_mid_round_and_resume(pkg, run, a, tmp_path, nproc=8)


def test_pipeline_workers_are_planned_and_their_rules_are_errors(tmp_path):
    flags = ["-D", "trainer_type=diloco", "-D", "pipeline_degree=2"]
    proc = run_fgc("explain", EXAMPLE, *flags, "-D", "nproc=8", "-D", "tensor_degree=2")
    assert proc.returncode == 0, proc.stderr
    assert "mesh: diloco=2 x dp=1 x pp=2 x tp=2" in proc.stdout
    assert ("DiLoCo: 2 workers of 4 ranks (a pipeline of 2 stages x tensor parallel over 2 ranks inside a "
            "worker)") in proc.stdout
    # each rank keeps the global parameters and momentum of its stages only: the busiest rank's
    # (stage 0: the embedding and 2 of the 3 layers, 227,808 parameters) x 8 bytes
    proc = run_fgc("explain", EXAMPLE, *flags, "-D", "nproc=4")
    assert "stage 0 on rank 0: embedding, layers 0-1: 227,808 parameters" in proc.stdout
    assert re.search(r"outer \(DiLoCo\) +1\.7 MiB", proc.stdout)
    proc = run_fgc("check", EXAMPLE, *flags, "-D", "nproc=6", "-D", "diloco_workers=2")
    assert proc.returncode == 2
    assert "error: a DiLoCo worker's 3 ranks (nproc 6 / 2 workers) do not split into pipelines of pipeline_degree 2" \
        in proc.stderr
    # FSDP2 per stage inside the workers (diloco_fsdp), planned: over a worker's pipelines
    proc = run_fgc("explain", EXAMPLE, *flags, "-D", "nproc=8", "-D", "diloco_workers=2", "-D", "diloco_fsdp=true")
    assert proc.returncode == 0, proc.stderr
    assert "mesh: diloco=2 x dp_shard=2 x pp=2" in proc.stdout
    assert ("DiLoCo: 2 workers of 4 ranks (2 pipelines of 2 stages sharded by FSDP2 per stage inside a "
            "worker)") in proc.stdout
    # the outer state is sharded as the stages are: half of the unsharded workers' 1.7 MiB
    assert re.search(r"outer \(DiLoCo\) +0\.9 MiB", proc.stdout)
    # a worker of one pipeline has nothing to shard over
    proc = run_fgc("check", EXAMPLE, *flags, "-D", "nproc=4", "-D", "diloco_fsdp=true")
    assert proc.returncode == 2
    assert ("error: FSDP2 inside DiLoCo workers needs workers of 2 or more data-parallel ranks: 2 workers of "
            "nproc 4 are one pipeline each") in proc.stderr
    proc = run_fgc("check", EXAMPLE, *flags, "-D", "nproc=4", "-D", "sample_every=2")
    assert proc.returncode == 2
    assert "text samples need the whole model on a rank: not available with pipeline stages" in proc.stderr
    # a config that writes the pipeline settings itself: FSDP2 per stage over workers of one
    # pipeline is an error at its fsdp line
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f'-- extends "{EXAMPLE}"\n[parallel]\n.parallel: &parallel !singleton:fgc.settings:PipelineSettings@parallel\n'
        "    nproc: 4\n    pipeline_degree: 2\n    data_degree: 2\n    fsdp: true\n"
    )
    proc = run_fgc("check", cfg, "-D", "trainer_type=diloco")
    assert proc.returncode == 2
    assert (f"cfg.yaml:{line_of(cfg, 'fsdp: true')}: error: FSDP2 inside DiLoCo workers needs workers of 2 or "
            "more data-parallel ranks: 2 workers of nproc 4 are one pipeline each") in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_workers_of_a_tensor_parallel_pipeline_match_workers_of_one_rank(tp_runs, tmp_path):
    """8 ranks as 2 workers, each a pipeline of 2 stages whose layers split over 2
    tensor-parallel ranks (mesh diloco x dp x pp x tp): the 2 one-rank workers' run."""
    _, plain_run = tp_runs["plain"]
    pkg = tmp_path / "pkg"
    knobs = ["microbatches=4" if k == "micro_batch_size=2" else k for k in TP_KNOBS]  # 4 micro-batches of 2
    run_fgc("build", EXAMPLE, "-o", pkg, *knobs, "-D", "nproc=8", "-D", "pipeline_degree=2", "-D", "tensor_degree=2",
            check=True)
    assert _plan(pkg)["mesh"] == {"diloco": 2, "dp": 1, "pp": 2, "tp": 2}
    run = tmp_path / "run"
    proc = _torchrun(pkg, run, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _assert_same_run(run, plain_run)


@pytest.mark.slow
def test_sharded_workers_with_the_chunked_loss_evaluate_and_sample_the_global_model(tmp_path):
    """DiLoCo around FSDP2 with the chunked loss head (the FSDP2 root is the head around the
    model): 2 workers of 2 ranks train, evaluate and sample as 2 one-rank workers do. Evaluation
    and samples run on the global model, put into every rank's shards and taken out again."""
    knobs = ["-D", "trainer_type=diloco", "-D", "diloco_inner_steps=2", "-D", "max_steps=4",
             "-D", "num_hidden_layers=2", "-D", "eval_every=2", "-D", "sample_every=2", "-D", "loss_impl=chunked"]
    runs = {}
    for name, flags, nproc in (("one", [], 2),
                               ("sharded", ["-D", "nproc=4", "-D", "diloco_workers=2", "-D", "diloco_fsdp=true"], 4)):
        pkg = tmp_path / f"pkg_{name}"
        run_fgc("build", EXAMPLE, "-o", pkg, *knobs, *flags, check=True)
        assert _plan(pkg)["kernels"]["cross_entropy"]["impl"] == "chunked"
        proc = _torchrun(pkg, tmp_path / f"run_{name}", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(x) for x in (tmp_path / f"run_{name}" / "metrics.jsonl").read_text().splitlines()]
        samples = [line for line in proc.stdout.splitlines() if line.startswith("sample at step")]
        runs[name] = (records, samples)
    (got, got_samples), (want, want_samples) = runs["sharded"], runs["one"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "eval_loss", "grad_norm"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4]
    assert len(got_samples) == 2 and got_samples == want_samples  # the same greedy text
