"""The chunked and Triton losses (the head and its loss outside the model's forward, through
fgc_runtime's LMHeadLoss) with every trainer: FSDP2 (the loss wrapper is FSDP2's root), the
pipeline (the last stage gives hidden states, the schedule's loss function applies the head),
tensor parallelism (which keeps the head whole on every rank), and the build error where a mesh
cannot run them (FSDP2-sharded stages with a schedule that splits the backward).

The torchrun tests train 2 (or 4) gloo ranks on the CPU and compare with the reference loss
(impl: torch) of the same config: fp32, relative tolerance 1e-5 (the losses differ only by the
order of float sums)."""

from __future__ import annotations

import difflib
import json
import re

import pytest
import torch

from conftest import EXAMPLE, line_of, run_fgc, small_config, tiny_causal_lm
from test_pipeline import _torchrun

COMMON = ["-D", "max_steps=3", "-D", "eval_every=3", "-D", "seq_len=64"]
FSDP2 = ["-D", "trainer_type=fsdp2", "-D", "num_hidden_layers=2", *COMMON]
PIPELINE = ["-D", "trainer_type=pipeline", "-D", "num_hidden_layers=4", *COMMON]
TEMPLATE = EXAMPLE.parent.parent.parent / "fgc" / "templates" / "lm" / "train.yaml"


# -- build-time rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["zbv-zero-bubble", "interleaved-zero-bubble", "dualpipev"])
@pytest.mark.parametrize("loss", ["chunked", "torch"])
def test_fsdp2_sharded_stages_with_a_split_backward_are_a_build_error(tmp_path, schedule, loss):
    """FSDP2 over a pipeline's replicas with a schedule that splits the backward: measured wrong
    (the first step's gradient norm differs from 1f1b's, with either loss), so one error at the
    schedule's line of lm/train.yaml, and nothing is built (1f1b builds)."""
    flags = ["-D", "trainer_type=fsdp2", "-D", "nproc=4", "-D", "pipeline_degree=2", "-D", "num_hidden_layers=4",
             "-D", f"loss_impl={loss}"]
    out = tmp_path / "build"
    proc = run_fgc("build", EXAMPLE, "-o", out, *flags, "-D", f"pipeline_schedule={schedule}")
    assert proc.returncode == 2, proc.stdout
    first = proc.stderr.splitlines()[0]
    assert (
        f"lm/train.yaml:{line_of(TEMPLATE, 'schedule: {{ ns.pipeline_schedule')}: error: the {schedule} schedule "
        "splits the backward into input and weight passes, which gives wrong gradients when FSDP2 shards the "
        "stages in this version"
    ) in first, first
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    run_fgc("check", EXAMPLE, *flags, "-D", "pipeline_schedule=1f1b", check=True)


def test_auto_takes_the_chunked_loss_with_every_trainer_and_mesh(tmp_path):
    """auto picks the chunked loss for large logits under FSDP2, the pipeline and tensor
    parallelism now (on HEAD: the reference, the trainer cannot)."""
    small = small_config(tmp_path)
    # 8 x 2048 tokens x 4096 vocabulary x 4 bytes = 256 MiB of logits a micro-batch
    big = ["-D", "batch_size=16", "-D", "seq_len=2048", "-D", "vocab_size=4096", "-D", "intermediate_size=64"]
    for flags in (
        ["-D", "trainer_type=fsdp2"],
        ["-D", "trainer_type=pipeline", "-D", "num_hidden_layers=4"],
        ["-D", "trainer_type=fsdp2", "-D", "nproc=4", "-D", "tensor_degree=2"],
    ):
        proc = run_fgc("explain", small, *big, *flags)
        assert proc.returncode == 0, proc.stderr
        assert "kernel cross_entropy: chunked (auto: one micro-batch's logits would take" in proc.stdout, flags


@pytest.mark.parametrize("flags", [FSDP2, PIPELINE], ids=["fsdp2", "pipeline"])
def test_triton_takes_the_chunked_losss_trainer_code(tmp_path, flags):
    """With FSDP2 and the pipeline, the Triton loss's train.py is the chunked loss's but for the
    implementation's name (and the plan's record of it): the same wrapper, root and stages."""
    sources = {}
    for impl in ("chunked", "triton"):
        run_fgc("build", EXAMPLE, "-o", tmp_path / impl, *flags, "-D", f"loss_impl={impl}", check=True)
        sources[impl] = (tmp_path / impl / "train.py").read_text().splitlines()
    # what may differ: the implementation's name, the plan's record of it and the config's hash
    # (the check that the Triton kernels have a CUDA device reads the plan: the same line)
    allowed = ("LOSS_IMPL =", "CONFIG_HASH =", '"cross_entropy": {', '"impl": "chunked"', '"impl": "triton"', '"reason":',
               '"chunk_budget_mib":', '"chunk_rows":', "},")
    changed = [line[2:] for line in difflib.ndiff(sources["chunked"], sources["triton"]) if line[:2] in ("- ", "+ ")]
    assert changed and all(any(a in line for a in allowed) for line in changed), changed
    chunked = "\n".join(sources["chunked"])
    if "trainer_type=fsdp2" in flags:
        # FSDP2's root is the loss head, and the step sync turns its gradient sync on and off
        assert "        root=loss_model," in chunked and "fsdp_root=loss_model)" in chunked
    else:
        # the pipeline's loss applies the head to the last stage's hidden states
        assert "head=False" in chunked and re.search(r"pipeline\.Pipeline\([^)]*\bloss_model\.loss_from_hidden,", chunked)


def test_the_loss_wrapper_gives_logits_and_the_loss_from_hidden_states():
    """LMHeadLoss without labels is the model's forward (sampling through the FSDP2 root);
    loss_from_hidden on the final hidden states is its loss (a pipeline's last stage)."""
    from fgc_runtime.kernels.cross_entropy import LMHeadLoss, cross_entropy_sum_and_count

    torch.manual_seed(0)
    model = tiny_causal_lm(11)
    ids = torch.randint(0, 11, (2, 7))
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100
    wrapper = LMHeadLoss(model, impl="chunked", chunk_size=3)
    torch.testing.assert_close(wrapper(ids), model(ids))
    want_sum, want_count = cross_entropy_sum_and_count(model(ids), labels)
    got_sum, got_count = wrapper.loss_from_hidden(model.hidden_states(ids), labels)
    torch.testing.assert_close(got_sum, want_sum, rtol=1e-5, atol=1e-6)
    assert int(got_count) == int(want_count) == 11


# -- training ---------------------------------------------------------------------------------------


def _records(records: list[dict]) -> tuple[list, list, list]:
    train = [r for r in records if "loss" in r]
    return [r["loss"] for r in train], [r["grad_norm"] for r in train], [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.mark.slow
def test_fsdp2_chunked_loss_trains_like_the_reference_and_resumes_exactly(tmp_path):
    """FSDP2 on 2 ranks (meta-device init, the loss wrapper as FSDP2's root): the chunked loss's
    losses, gradient norms and eval loss are the reference's; checkpoints keep the model's own
    names and values; a run stopped after 2 steps resumes bitwise; the Hugging Face export and a
    text sample (through the root) work. Then HSDP on 4 ranks gives the same losses."""
    ref, chunked = tmp_path / "ref", tmp_path / "chunked"
    run_fgc("build", EXAMPLE, "-o", ref, *FSDP2, check=True)
    run_fgc("build", EXAMPLE, "-o", chunked, *FSDP2, "-D", "loss_impl=chunked", "-D", "sample_every=3", check=True)
    assert 'build_model(device="meta")' in (chunked / "train.py").read_text()
    reference = _records(_torchrun(ref / "train.py", tmp_path / "r_ref"))
    full = _records(_torchrun(chunked / "train.py", tmp_path / "r_full"))
    for got, want in zip(full, reference):
        assert got == pytest.approx(want, rel=1e-5)
    step = "checkpoints/step-00000003/model.pt"
    want_state, got_state = torch.load(tmp_path / "r_ref" / step), torch.load(tmp_path / "r_full" / step)
    assert sorted(got_state) == sorted(want_state) and "lm_head.weight" in got_state
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "r_full" / "final").iterdir()) == sorted(
        p.name for p in (tmp_path / "r_ref" / "final").iterdir()
    )
    assert (tmp_path / "r_full" / "samples.jsonl").read_text().strip()

    _torchrun(chunked / "train.py", tmp_path / "r_part", "--max-steps", "2")
    resumed = _records(_torchrun(chunked / "train.py", tmp_path / "r_part"))
    assert resumed[0] == full[0]  # bitwise

    hsdp = tmp_path / "hsdp"
    run_fgc("build", EXAMPLE, "-o", hsdp, *FSDP2, "-D", "loss_impl=chunked", "-D", "nproc=4",
            "-D", "replicate_degree=2", check=True)
    assert json.loads((hsdp / "manifest.json").read_text())["plan"]["mesh"] == {"dp_replicate": 2, "dp_shard": 2}
    losses = _records(_torchrun(hsdp / "train.py", tmp_path / "r_hsdp", nproc=4))[0]
    assert losses == pytest.approx(reference[0], rel=1e-5)


@pytest.mark.slow
def test_every_pipeline_schedule_trains_the_chunked_loss_like_the_reference(tmp_path):
    """On 2 ranks, each of torch's seven schedules (the zero-bubble ones split the backward: the
    head's weight, used by the loss function outside the last stage's forward, still gets its
    gradient) gives the reference's losses, gradient norms and eval loss with the chunked loss;
    the loss is normalised by the global target count as before. Then 2 pipelines whose
    replicas shard with FSDP2 (1f1b, 4 ranks)."""
    ref = tmp_path / "ref"
    run_fgc("build", EXAMPLE, "-o", ref, *PIPELINE, "-D", "pipeline_schedule=1f1b", check=True)
    reference = _records(_torchrun(ref / "train.py", tmp_path / "r_ref"))
    for schedule in ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zero-bubble",
                     "zbv-zero-bubble", "dualpipev"):
        out = tmp_path / schedule
        run_fgc("build", EXAMPLE, "-o", out, *PIPELINE, "-D", f"pipeline_schedule={schedule}",
                "-D", "loss_impl=chunked", check=True)
        got = _records(_torchrun(out / "train.py", tmp_path / f"r_{schedule}"))
        for values, want in zip(got, reference):
            assert values == pytest.approx(want, rel=1e-5), schedule

    fsdp = tmp_path / "fsdp"
    run_fgc("build", EXAMPLE, "-o", fsdp, "-D", "trainer_type=fsdp2", "-D", "nproc=4", "-D", "pipeline_degree=2",
            "-D", "num_hidden_layers=4", *COMMON, "-D", "loss_impl=chunked", check=True)
    assert "fsdp2 per stage" in json.loads((fsdp / "manifest.json").read_text())["plan"]["apply_order"]
    got = _records(_torchrun(fsdp / "train.py", tmp_path / "r_fsdp", nproc=4))
    for values, want in zip(got, reference):
        assert values == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_tensor_parallel_meshes_train_the_chunked_loss_like_the_reference(tmp_path):
    """Tensor parallelism keeps the head whole on every rank (only the decoder layers are split),
    so the chunked loss runs there as the reference does: DDP x TP, FSDP2 x TP and pipeline x TP
    on 4 ranks give the reference's losses, gradient norms and eval loss of the same mesh."""
    meshes = {
        "ddp": ["-D", "trainer_type=ddp", "-D", "num_hidden_layers=2"],
        "fsdp2": ["-D", "trainer_type=fsdp2", "-D", "num_hidden_layers=2"],
        "pipeline": ["-D", "trainer_type=pipeline", "-D", "pipeline_degree=2", "-D", "num_hidden_layers=4"],
    }
    for name, flags in meshes.items():
        runs = {}
        for impl in ("torch", "chunked"):
            out = tmp_path / f"{name}-{impl}"
            run_fgc("build", EXAMPLE, "-o", out, *flags, *COMMON, "-D", "nproc=4", "-D", "tensor_degree=2",
                    "-D", f"loss_impl={impl}", check=True)
            runs[impl] = _records(_torchrun(out / "train.py", tmp_path / f"r-{name}-{impl}", nproc=4))
        assert "tp" in json.loads((out / "manifest.json").read_text())["plan"]["mesh"]
        for values, want in zip(runs["chunked"], runs["torch"]):
            assert values == pytest.approx(want, rel=1e-5), name

