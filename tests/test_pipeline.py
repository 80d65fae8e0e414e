"""Pipeline parallelism: the stage split, the plan, the cross-field checks, and training with each
of torch's seven schedules on 2 gloo ranks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, line_of, run_fgc
from fgc_lowering.stages import balanced_split, stage_ranks

# -- the split ------------------------------------------------------------------------------------


def _brute_force_best(layer_params, stages, first, last):
    best = None
    n = len(layer_params)
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        costs = [sum(layer_params[a:b]) for a, b in zip(bounds, bounds[1:])]
        costs[0] += first
        costs[-1] += last
        best = max(costs) if best is None else min(best, max(costs))
    return best


@pytest.mark.parametrize(
    "layer_params,stages,first,last",
    [
        ([10] * 8, 4, 30, 30),
        ([10] * 8, 2, 0, 0),
        ([5, 1, 1, 9, 2, 2, 7], 3, 4, 0),
        ([3, 3, 3, 3, 3], 5, 100, 100),
        ([1, 2, 3, 4, 5, 6], 2, 0, 12),
    ],
)
def test_balanced_split_is_contiguous_and_minimises_the_largest_stage(layer_params, stages, first, last):
    runs = balanced_split(layer_params, stages, first, last)
    assert len(runs) == stages
    assert runs[0][0] == 0 and runs[-1][1] == len(layer_params)
    assert all(a < b for a, b in runs)  # at least one layer each
    assert all(r[1] == s[0] for r, s in zip(runs, runs[1:]))  # contiguous
    costs = [sum(layer_params[a:b]) for a, b in runs]
    costs[0] += first
    costs[-1] += last
    assert max(costs) == _brute_force_best(layer_params, stages, first, last)


def test_balanced_split_evens_out_the_stages_below_the_largest():
    # the embedding and head make stages 0 and 3 the largest; the middle two share 6 layers evenly
    assert balanced_split([10] * 8, 4, 30, 30) == [(0, 1), (1, 4), (4, 7), (7, 8)]


def test_stage_ranks_loop_and_v_layouts():
    assert stage_ranks(4, 4, "single") == [0, 1, 2, 3]
    assert stage_ranks(6, 3, "loop") == [0, 1, 2, 0, 1, 2]
    assert stage_ranks(6, 3, "v") == [0, 1, 2, 2, 1, 0]


# -- the plan and the checks ----------------------------------------------------------------------

CORPUS = "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(200))


def _config(tmp_path: Path, parallel: str, meta: str = "", extra: str = "") -> Path:
    (tmp_path / "corpus.txt").write_text(CORPUS)
    path = tmp_path / "pp.yaml"
    path.write_text(
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.hidden_size = 64\n"
        "-- set ns.num_hidden_layers = 4\n"
        "-- set ns.seq_len = 32\n"
        "-- set ns.batch_size = 8\n"
        '-- set ns.trainer_type = "pipeline"\n'
        f"{meta}"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        "    text_files: [corpus.txt]\n"
        "[parallel]\n"
        ".parallel: &parallel !singleton:fgc.settings:PipelineSettings@parallel\n"
        f"{parallel}"
        f"{extra}"
    )
    return path


@pytest.mark.parametrize(
    "parallel,meta,bad_line,message",
    [
        (
            "    nproc: 4\n    pipeline_degree: 2\n",
            "",
            "nproc: 4",
            "the world size (nproc 4) is not the product of the parallel degrees: "
            "pipeline_degree 2 x data_degree 1 = 2",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    microbatches: 1\n",
            "",
            "microbatches: 1",
            "microbatches (1) must be at least the number of pipeline stages (2)",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    microbatches: 3\n",
            "",
            "ns.batch_size = 8",
            "the batch of each pipeline (8 = batch_size 8 / data_degree 1) is not divisible by microbatches 3",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    schedule: 1f1b\n    stages_per_rank: 2\n",
            "",
            "stages_per_rank: 2",
            "the 1f1b schedule runs one stage per rank, not 2",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    schedule: dualpipev\n    stages_per_rank: 3\n",
            "",
            "stages_per_rank: 3",
            "the dualpipev schedule runs exactly 2 stages per rank (the V layout), not 3",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    schedule: interleaved-1f1b\n    stages_per_rank: 3\n",
            "",
            "stages_per_rank: 3",
            "6 pipeline stages (pipeline_degree 2 x 3 per rank) for 4 decoder layers",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    schedule: interleaved-1f1b\n    microbatches: 5\n",
            "",
            "microbatches: 5",
            "needs microbatches to be a multiple of its rounds",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n    schedule: zbv-zero-bubble\n",
            "-- set ns.compile = true\n",
            "ns.compile = true",
            "splits the backward into input and weight gradients",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n",
            "-- set ns.tie_word_embeddings = true\n",
            "tie_word_embeddings = true",
            "tied word embeddings are not supported with pipeline parallelism",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n",
            "-- set ns.micro_batch_size = 2\n",
            "micro_batch_size = 2",
            "micro_batch_size does not apply to the pipeline trainer",
        ),
        (
            "    nproc: 2\n    pipeline_degree: 2\n",
            '-- set ns.precision = "fp16-mixed"\n',
            'precision = "fp16-mixed"',
            "fp16 is not supported with pipeline parallelism",
        ),
    ],
)
def test_pipeline_rules_are_errors_at_the_offendingline_of(tmp_path, parallel, meta, bad_line, message):
    path = _config(tmp_path, parallel, meta)
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"pp.yaml:{line_of(path, bad_line)}" in proc.stderr


def test_eval_batch_must_equal_the_train_batch_under_pipelining(tmp_path):
    path = _config(
        tmp_path,
        "    nproc: 2\n    pipeline_degree: 2\n",
        extra="[logging]\n.logging: &logging !singleton:fgc.settings:LoggingSettings@logging\n"
        "    eval_batch_size: 4\n",
    )
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    assert f"pp.yaml:{line_of(path, 'eval_batch_size: 4')}: error: under pipeline parallelism the eval batch" in proc.stderr


def test_the_plan_splits_layers_by_parameter_count(tmp_path):
    path = _config(tmp_path, "    nproc: 2\n    pipeline_degree: 2\n    schedule: zbv-zero-bubble\n")
    out = tmp_path / "build"
    run_fgc("build", path, "-o", out, check=True)
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert plan["mesh"] == {"dp": 1, "pp": 2}
    pipeline = plan["pipeline"]
    assert pipeline["schedule"] == "zbv-zero-bubble" and pipeline["layout"] == "v"
    assert pipeline["microbatches"] == 4  # one per stage by default
    assert [s["rank"] for s in pipeline["stages"]] == [0, 1, 1, 0]
    assert [s["layers"] for s in pipeline["stages"]] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    # the stage parameter counts add up to the model's
    sys.path.insert(0, str(out))
    try:
        import model as built

        total = sum(p.numel() for p in built.build_model(device="meta").parameters())
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("model", None)
    assert sum(s["params"] for s in pipeline["stages"]) == total
    explain = run_fgc("explain", path)
    assert explain.returncode == 0, explain.stderr
    assert "stage 3 on rank 0: layers 3-3" in explain.stdout


# -- training ---------------------------------------------------------------------------------------


def _torchrun(train_py: Path, out: Path, *flags, nproc: int = 2) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(train_py),
         "--output-dir", str(out), "--log-every", "1", *map(str, flags)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = ["-D", "num_hidden_layers=4", "-D", "max_steps=3", "-D", "eval_every=3", "-D", "seq_len=64"]


@pytest.fixture(scope="module")
def basic_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basic")
    out = tmp / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", *COMMON, check=True)
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp / "run"), "--log-every", "1"],
        capture_output=True, text=True, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule",
    ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zero-bubble", "zbv-zero-bubble", "dualpipev"],
)
def test_every_schedule_trains_like_one_process(tmp_path, schedule, basic_losses):
    """Each schedule, on 2 ranks, takes the steps the basic trainer takes (up to float summation
    order): the loss of a step is normalised by its global target count over micro-batches."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=pipeline", "-D", f"pipeline_schedule={schedule}",
            *COMMON, check=True)
    records = _torchrun(out / "train.py", tmp_path / "run")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    reference = [r for r in basic_losses if "loss" in r]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in reference], rel=2e-5)
    assert [r["grad_norm"] for r in train] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4)
    assert [r["tokens"] for r in train] == [r["tokens"] for r in reference]
    assert evals[0]["eval_loss"] == pytest.approx(
        next(r for r in basic_losses if "eval_loss" in r)["eval_loss"], rel=2e-5
    )


@pytest.mark.slow
def test_pipeline_resumes_exactly_and_runs_with_data_parallel_replicas(tmp_path, basic_losses):
    """Stop after 2 steps and resume (checkpoints hold the whole model, gathered from the
    stages): bitwise the losses of one run. Then 2 pipelines of 2 stages on 4 ranks."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=pipeline", "-D", "pipeline_schedule=interleaved-1f1b",
            *COMMON, "-D", "eval_every=0", check=True)
    full = [r["loss"] for r in _torchrun(out / "train.py", tmp_path / "full")]
    _torchrun(out / "train.py", tmp_path / "part", "--max-steps", "2")
    resumed = [r["loss"] for r in _torchrun(out / "train.py", tmp_path / "part")]
    assert resumed == full
    state = __import__("torch").load(tmp_path / "full" / "checkpoints" / "step-00000003" / "model.pt")
    assert "model.embed_tokens.weight" in state and "lm_head.weight" in state
    assert "model.layers.3.mlp.up_proj.weight" in state

    dp = tmp_path / "dp"
    run_fgc("build", EXAMPLE, "-o", dp, "-D", "trainer_type=pipeline", "-D", "nproc=4", "-D", "data_degree=2",
            *COMMON, "-D", "eval_every=0", check=True)
    assert json.loads((dp / "manifest.json").read_text())["plan"]["mesh"] == {"dp": 2, "pp": 2}
    losses = [r["loss"] for r in _torchrun(dp / "train.py", tmp_path / "dprun", nproc=4)]
    reference = [r["loss"] for r in basic_losses if "loss" in r]
    assert losses == pytest.approx(reference, rel=2e-5)


def _stage_worker(rank, port, package, results):
    """One rank: the model built on the meta device, then its stage materialised by build_stages."""
    import os
    import sys

    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, package)
    from model import build_model

    from fgc_runtime import pipeline
    from fgc_runtime.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    plan = {"stages": [{"stage": 0, "rank": 0, "layers": [0, 2]}, {"stage": 1, "rank": 1, "layers": [2, 3]}]}
    torch.manual_seed(7)
    whole = build_model()
    torch.manual_seed(7)
    model = build_model(device="meta")
    part, _ = pipeline.build_stages(model, plan, rank, torch.distributed.group.WORLD, info.device)
    whole_params = dict(whole.named_parameters())
    results[rank] = {
        "materialised": sorted(n for n, p in model.named_parameters() if not p.is_meta),
        "part": sorted(n for n, _ in part.named_parameters()),
        "equal": all(torch.equal(p, whole_params[n]) for n, p in model.named_parameters() if not p.is_meta),
        "rotary": torch.equal(model.model.positions.inv_freq, whole.model.positions.inv_freq),
    }
    shutdown(info)


def test_a_rank_materialises_only_its_stages_with_the_whole_models_values(tmp_path):
    """The pipeline trainer builds the model on the meta device; build_stages gives each rank
    only its stages' tensors, with the values a model built whole would have."""
    import socket

    import torch.multiprocessing as mp

    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=pipeline", check=True)
    assert 'model = build_model(device="meta")' in (out / "train.py").read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_stage_worker, args=(port, str(out), results), nprocs=2, join=True, start_method="spawn")
        results = dict(results)
    first, last = results[0], results[1]
    assert first["materialised"] == first["part"]
    assert last["materialised"] == last["part"]
    assert first["materialised"][0] == "model.embed_tokens.weight"
    assert not any(".layers.2." in n or n.startswith("lm_head") for n in first["materialised"])
    assert "lm_head.weight" in last["materialised"] and "model.norm.weight" in last["materialised"]
    assert not any(".layers.0." in n or ".layers.1." in n or "embed" in n for n in last["materialised"])
    assert first["equal"] and last["equal"] and first["rotary"] and last["rotary"]
