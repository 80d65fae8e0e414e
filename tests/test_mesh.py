"""Parallel dimensions: meshes of several data-parallel and tensor-parallel dimensions (HSDP, DDP
with tensor parallelism), their plan, their build-time rules, and training on 4 gloo ranks
against the one-process trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc
from family_checks import logged_losses, train

KNOBS = ["-D", "max_steps=3", "-D", "eval_every=0", "-D", "batch_size=8", "-D", "micro_batch_size=1"]


def _plan(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["plan"]


@pytest.mark.parametrize(
    "flags,mesh,described",
    [
        (
            ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=2", "-D", "nproc=4"],
            {"dp_replicate": 2, "dp_shard": 2},
            "fully sharded (FSDP2) over 4 processes per node (torchrun): 2 copies (HSDP), each sharded over 2 ranks",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=2", "-D", "tensor_degree=2", "-D", "nproc=8"],
            {"dp_replicate": 2, "dp_shard": 2, "tp": 2},
            "2 copies (HSDP), each sharded over 2 ranks, 4 data-parallel groups x 2 tensor-parallel ranks",
        ),
        (
            ["-D", "trainer_type=ddp", "-D", "tensor_degree=2", "-D", "nproc=4"],
            {"dp": 2, "tp": 2},
            "DistributedDataParallel over 4 processes per node (torchrun): 2 data-parallel groups x 2 tensor-parallel ranks",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2", "-D", "nproc=4"],
            {"dp_shard": 2, "pp": 2},
            "pipeline parallel over 4 processes per node (torchrun): 2 stages on 2 ranks (1f1b, 2 micro-batches) x 2 FSDP2-sharded replicas",
        ),
        (
            ["-D", "trainer_type=pipeline", "-D", "tensor_degree=2", "-D", "nproc=4"],
            {"dp": 1, "pp": 2, "tp": 2},
            "pipeline parallel over 4 processes per node (torchrun): the layers of each stage split over 2 tensor-parallel ranks, 2 stages on 2 ranks",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "diloco_workers=2", "-D", "nproc=4"],
            {"diloco": 2, "dp": 2},
            "DiLoCo over 4 processes per node (torchrun), syncing every 20 steps: 2 workers of 2 ranks (DDP inside a worker)",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "diloco_workers=2", "-D", "diloco_fsdp=true", "-D", "nproc=4"],
            {"diloco": 2, "dp_shard": 2},
            "DiLoCo over 4 processes per node (torchrun), syncing every 20 steps: 2 workers of 2 ranks (FSDP2 inside a worker)",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "tensor_degree=2", "-D", "nproc=4"],
            {"diloco": 2, "tp": 2},
            "DiLoCo over 4 processes per node (torchrun), syncing every 20 steps: 2 workers of 2 ranks (tensor parallel over 2 ranks inside a worker)",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "diloco_workers=2", "-D", "tensor_degree=2", "-D", "nproc=8"],
            {"diloco": 2, "dp": 2, "tp": 2},
            "DiLoCo over 8 processes per node (torchrun), syncing every 20 steps: 2 workers of 4 ranks (tensor parallel over 2 ranks, DDP over 2 groups inside a worker)",
        ),
    ],
)
def test_the_mesh_is_the_product_of_the_degrees(tmp_path, flags, mesh, described):
    out = tmp_path / "build"
    proc = run_fgc("build", EXAMPLE, "-o", out, *flags, check=True)
    plan = _plan(out)
    assert plan["mesh"] == mesh
    # the build's last line names the mesh (the trainer type alone hides e.g. FSDP2 x PP)
    degrees = " x ".join(f"{d}={n}" for d, n in mesh.items() if not (d == "dp" and n == 1))
    assert f"trainer, mesh {degrees}); run: torchrun" in proc.stderr.splitlines()[-1]
    source = (out / "train.py").read_text()
    assert described in source
    # fgc_runtime.mesh.layout builds the plan's mesh; parallelize applies apply_order with it
    assert "mesh, dp_rank, dp_size, grad_accum_steps = layout(PLAN, dist)" in source
    assert "parallelize(model, PLAN, dist, mesh" in " ".join(source.split()).replace("( ", "(")
    if "tp" in mesh:
        assert plan["apply_order"][0] == "tensor parallel"
    if "dp_replicate" in mesh:
        assert "hybrid" in plan["fsdp_units"]
        assert "sharded over dp_shard, replicated over dp_replicate" in " ".join(source.split())
    if "pp" in mesh:
        assert "pipeline stages" in plan["apply_order"]
        assert ("fsdp2 per stage" in plan["apply_order"]) == ("dp_shard" in mesh)
        # pipeline.parallelize_stages (fgc_runtime/pipeline.py) shards the stages when apply_order says so
        assert "part, stages = pipeline.parallelize_stages(model, PLAN, dist, mesh" in source
        assert ("FSDP2 then shards each stage" in " ".join(source.replace("#", " ").split())) == ("dp_shard" in mesh)
        # FSDP2 reduces the replicas' gradients; plain replicas sum theirs by hand (the
        # pipeline's step sync, fgc_runtime/pipeline.py, after the schedule)
        sharded = "dp_shard" in mesh
        # pipeline_sync reads it from the plan's apply_order (tests/runtime/test_pipeline_runner.py)
        assert "sync = pipeline.pipeline_sync(PLAN, dist, mesh, model=part)" in source
        assert ("(FSDP2 reduces the gradients)" in source) == sharded
    if "diloco" in mesh:  # DDP or FSDP2 inside each worker, and the workers sync over the outer group
        # (the step sync, fgc_runtime/step.py, wraps the model; train.py says who syncs)
        assert "sync = step_sync(PLAN, dist, mesh," in source
        ddp = "dp" in mesh and "tp" not in mesh  # with tensor parallelism, an explicit mean instead of DDP
        assert ("DDP averages them over the ranks of each DiLoCo worker only" in source) == ddp
        assert ("FSDP2 reduces them over the ranks of each DiLoCo worker only" in source) == ("dp_shard" in mesh)
        assert ("an explicit mean after the backward over the ranks of each DiLoCo worker" in source) == (
            "dp" in mesh and "tp" in mesh
        )
        assert ("each DiLoCo worker is one tensor-parallel group" in source) == (list(mesh) == ["diloco", "tp"])
        flat = " ".join(source.replace("#", " ").split())  # the comments' wrapped lines as one text
        assert ("then the root, sharded over the ranks of each DiLoCo worker)" in flat) == ("dp_shard" in mesh)
        assert [s for s in plan["apply_order"] if s != "tensor parallel"] == (["fsdp2"] if "dp_shard" in mesh else [])
        # each rank's own state and the global parameters: DiLoCo's checkpoint, not the gathered one
        assert "outer=diloco)" in source and "train_state = sync.train_state(optimizer)" in source
        assert "A checkpoint holds the global parameters (model.pt" in source
        assert "outer_group=mesh.outer_group," in source
    if flags[1] == "trainer_type=ddp":  # no DDP wrapper: the gradients of tensor-parallel shards are averaged by hand
        assert "sync = step_sync(PLAN, dist, mesh," in source
        assert "an explicit mean after the backward over the data-parallel groups" in source


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=3", "-D", "nproc=4"],
            "the 4 data-parallel ranks (nproc 4) do not split into replicate_degree 3 copies",
        ),
        (
            ["-D", "trainer_type=ddp", "-D", "replicate_degree=2", "-D", "nproc=4"],
            "replicate_degree has no effect with trainer_type ddp",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "data_degree=2", "-D", "nproc=4"],
            "data_degree has no effect with trainer_type fsdp2",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2", "-D", "replicate_degree=2", "-D", "nproc=8"],
            "replicate_degree with a pipeline_degree is not supported in this version of fgc",
        ),
        (
            ["-D", "trainer_type=ddp", "-D", "pipeline_degree=2", "-D", "nproc=4"],
            "pipeline_degree has no effect with trainer_type ddp",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2", "-D", "data_degree=2", "-D", "nproc=4"],
            "data_degree is derived with trainer_type fsdp2 and a pipeline_degree",
        ),
        (
            ["-D", "trainer_type=ddp", "-D", "tensor_degree=2", "-D", "precision=fp16-mixed", "-D", "nproc=4"],
            "fp16-mixed is not supported with tensor parallelism in this version",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "diloco_workers=3", "-D", "nproc=4"],
            "nproc 4 does not split into 3 DiLoCo workers: each worker is nproc / workers ranks",
        ),
        (
            ["-D", "trainer_type=ddp", "-D", "diloco_workers=2", "-D", "nproc=4"],
            "diloco_workers has no effect with trainer_type ddp",
        ),
        (
            ["-D", "trainer_type=diloco", "-D", "diloco_fsdp=true", "-D", "nproc=4"],
            "FSDP2 inside DiLoCo workers needs workers of 2 or more data-parallel ranks: 4 workers of nproc 4 are one rank each",
        ),
        (
            ["-D", "trainer_type=fsdp2", "-D", "diloco_fsdp=true", "-D", "nproc=4"],
            "diloco_fsdp has no effect with trainer_type fsdp2",
        ),
    ],
)
def test_a_mesh_the_degrees_cannot_make_is_an_error(flags, message):
    proc = run_fgc("check", EXAMPLE, *flags)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process losses of the example, 3 steps of 8 sequences."""
    tmp = tmp_path_factory.mktemp("basic")
    run_fgc("build", EXAMPLE, "-o", tmp / "basic", "-D", "trainer_type=basic", *KNOBS, check=True)
    proc = train(tmp / "basic", "--output-dir", tmp / "run", "--log-every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logged_losses(tmp / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=2"],  # HSDP: 2 copies x 2 shards
        ["-D", "trainer_type=ddp", "-D", "tensor_degree=2"],  # 2 DDP replicas x 2 tensor-parallel ranks
        ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2"],  # 2 stages x 2 FSDP2 shards
        ["-D", "trainer_type=pipeline", "-D", "tensor_degree=2"],  # 2 stages x 2 tensor-parallel ranks
    ],
    ids=["hsdp", "ddp-x-tp", "fsdp2-x-pp", "tp-x-pp"],
)
def test_a_4_rank_mesh_matches_one_process_resumes_bitwise_and_exports(tmp_path, reference, flags):
    out = tmp_path / "build"
    knobs = KNOBS if "pipeline_degree=2" not in flags and "trainer_type=pipeline" not in flags else KNOBS[:-2]
    run_fgc("build", EXAMPLE, "-o", out, "-D", "nproc=4", *flags, *knobs, check=True)
    proc = train(out, "--output-dir", tmp_path / "full", "--log-every", "1", torchrun=True, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = logged_losses(tmp_path / "full")
    assert full == pytest.approx(reference, rel=1e-6)
    for more in (["--max-steps", "2"], []):  # the second run resumes from step 2
        proc = train(out, "--output-dir", tmp_path / "part", "--log-every", "1", *more, torchrun=True, nproc=4)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert logged_losses(tmp_path / "part") == full
    # the end of training exported the whole model: the same tensors as the one-process shapes
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert exported["model.layers.0.self_attn.q_proj.weight"].shape == (96, 96)
    assert exported["lm_head.weight"].shape[1] == 96
    # launched on the wrong number of ranks: one line naming the mesh
    proc = train(out, "--output-dir", tmp_path / "two", torchrun=True, nproc=2)
    assert proc.returncode != 0
    # each rank's one-line error (torchrun adds its own report of the failed ranks)
    assert "\nerror: this package runs on a mesh of 4 ranks (" in "\n" + proc.stderr


def test_explain_shows_the_mesh_as_a_table_of_dimensions_and_ranks():
    proc = run_fgc("explain", EXAMPLE, "-D", "trainer_type=fsdp2", "-D", "nproc=8", "-D", "replicate_degree=2",
                   "-D", "tensor_degree=2", check=True)
    lines = proc.stdout.splitlines()
    table = lines[lines.index("  mesh:") + 1 :][:5]
    assert table[0].split() == ["dimension", "degree", "ranks", "with", "rank", "0", "what", "it", "does"]
    # each dimension, its degree, and the ranks of rank 0's group along it (row-major: tp fastest)
    assert table[1].split()[:4] == ["dp_replicate", "2", "0,", "4"]
    assert table[2].split()[:4] == ["dp_shard", "2", "0,", "2"]
    assert table[3].split()[:4] == ["tp", "2", "0,", "1"]
    assert table[4] == (
        "    rank=(dp_replicate, dp_shard, tp): 0=(0, 0, 0) 1=(0, 0, 1) 2=(0, 1, 0) 3=(0, 1, 1) "
        "4=(1, 0, 0) 5=(1, 0, 1) 6=(1, 1, 0) 7=(1, 1, 1)"
    )
    assert "  mesh:" not in run_fgc("explain", EXAMPLE, "-D", "trainer_type=basic", check=True).stdout


# -- the training program -------------------------------------------------------------------------


def _program(stdout: str, pass_name: str) -> dict:
    """The JSON the build printed after '# training program after PASS'."""
    text = stdout.split(f"# training program after {pass_name}\n", 1)[1]
    return json.loads(text[: text.index("\n}\n") + 2])


def test_dump_after_prints_the_typed_program_with_the_line_of_every_setting(tmp_path):
    proc = run_fgc(
        "build", EXAMPLE, "-o", tmp_path / "out", "--dump-after", "plan-training",
        "-D", "trainer_type=fsdp2", "-D", "nproc=8", "-D", "replicate_degree=2", "-D", "tensor_degree=2",
        check=True,
    )
    program = _program(proc.stdout, "plan-training")
    assert program["settings"]["type"] == "FSDP2Trainer"
    assert program["settings"]["parallel"] == {
        "type": "FSDPSettings", "nproc": 8, "tensor_degree": 2, "reshard_after_forward": True, "replicate_degree": 2,
    }
    assert program["plan"]["mesh"] == {"dp_replicate": 2, "dp_shard": 2, "tp": 2}
    assert program["plan"]["tensor_parallel"]["degree"] == 2
    # a -D names itself; a value of the example names the example's line; an unset one is a default
    assert program["provenance"]["parallel.replicate_degree"].startswith("-D replicate_degree=2 (")
    assert program["provenance"]["seq_len"].startswith("examples/tiny_llama/train.yaml:")
    assert program["provenance"]["device"] == "default"
    # the kernel choices come later, from select-kernels
    assert program["plan"]["kernels"] == {}
    later = _program(
        run_fgc("build", EXAMPLE, "-o", tmp_path / "out2", "--dump-after", "select-kernels", check=True).stdout,
        "select-kernels",
    )
    assert later["plan"]["kernels"]["cross_entropy"]["impl"] == "torch"
    early = run_fgc("build", EXAMPLE, "-o", tmp_path / "out3", "--dump-after", "resolve-variables", check=True)
    assert "# training program after resolve-variables: not planned yet" in early.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=2", "-D", "tensor_degree=2", "-D", "micro_batch_size=1"],
        ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2", "-D", "tensor_degree=2"],
    ],
    ids=["hsdp-x-tp", "fsdp2-x-pp-x-tp"],
)
def test_a_3d_mesh_on_8_ranks_matches_one_process(tmp_path, reference, flags):
    """The dimensions compose: dp_replicate x dp_shard x tp, and dp_shard x pp x tp."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "nproc=8", *flags, *KNOBS[:-2], check=True)
    assert len(_plan(out)["mesh"]) == 3
    proc = train(out, "--output-dir", tmp_path / "run", "--log-every", "1", torchrun=True, nproc=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_losses(tmp_path / "run") == pytest.approx(reference, rel=1e-6)
