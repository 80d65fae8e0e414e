"""The first hour (issue #19): launch.sh --help, torch's schedule names, the progress bar's last
line, fgc ls outside a project, a too-small validation split, and fgc new."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import EXAMPLE, run_fgc


def test_launch_help_prints_the_scripts_usage_not_torchruns(tmp_path):
    out = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=ddp", check=True)
    for flag in ("--help", "-h"):
        proc = subprocess.run(["bash", str(out / "launch.sh"), flag], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: launch.sh [--devices 0,1,3] [--dry-run]")
        assert "This package's plan: 2 processes." in proc.stdout
        assert "torchrun" not in proc.stdout.splitlines()[0] and "usage: torchrun" not in proc.stdout
    # after `--` the flag is train.py's
    proc = subprocess.run(["bash", str(out / "launch.sh"), "--dry-run", "--", "--help"], capture_output=True, text=True)
    assert proc.stdout.strip().endswith("train.py --help")


def test_torch_schedule_class_names_are_aliases(tmp_path):
    flags = ["-D", "trainer_type=pipeline", "-D", "num_hidden_layers=4"]
    for name in ("ScheduleZBVZeroBubble", "zbv-zero-bubble"):
        run_fgc("build", EXAMPLE, "-o", tmp_path / name, *flags, "-D", f"pipeline_schedule={name}", check=True)
    alias, own = (json.loads((tmp_path / n / "manifest.json").read_text())["plan"] for n in ("ScheduleZBVZeroBubble", "zbv-zero-bubble"))
    assert alias == own and alias["pipeline"]["schedule"] == "zbv-zero-bubble"
    assert 'PIPELINE_SCHEDULE = "zbv-zero-bubble"' in (tmp_path / "ScheduleZBVZeroBubble" / "train.py").read_text()
    proc = run_fgc("build", EXAMPLE, "-o", tmp_path / "bad", *flags, "-D", "pipeline_schedule=Schedule1f1b")
    assert proc.returncode == 2 and "got 'Schedule1f1b'" in proc.stderr and "'Schedule1F1B'" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_the_progress_bars_last_line_ends_before_the_export_line(tmp_path):
    out = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", "-D", "max_steps=2", "-D", "seq_len=32",
            "-D", "batch_size=2", check=True)
    # stdout a terminal: the bar is drawn
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp_path / "run")],
        stdout=follower, stderr=subprocess.DEVNULL, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait() == 0
    text = b"".join(chunks).decode()
    assert "2/2 [########################] 100%" in text  # the bar was drawn
    before, _, _ = text.partition("wrote ")
    assert before.endswith("\n"), repr(before[-80:])


def test_ls_outside_a_project_lists_the_working_directory_and_skips_builds(tmp_path):
    (tmp_path / "exp").mkdir()
    for name in ("train.yaml", "corpus.txt"):
        (tmp_path / "exp" / name).write_bytes((EXAMPLE.parent / name).read_bytes())
    run_fgc("build", tmp_path / "exp" / "train.yaml", "-o", tmp_path / "exp" / "build", check=True)
    proc = run_fgc("ls", cwd=tmp_path)
    # the package's generated config.yaml is not listed (it would not build: its corpus is elsewhere)
    assert (proc.returncode, proc.stdout) == (0, "exp/train.yaml: OK\n"), proc.stdout + proc.stderr


def test_a_validation_split_too_small_for_one_eval_batch_says_what_to_do(tmp_path):
    from fgc_runtime import data
    from fgc_runtime.errors import RunError

    docs = [[5] * 40 for _ in range(10)]
    data.write_token_shards(tmp_path, docs, vocab_size=300, eos_id=0, tokenizer="byte", val_fraction=0.2)
    val = data.TokenShard.open(tmp_path, "val")  # 2 documents of 41 tokens: 2 windows of 33
    with pytest.raises(RunError) as err:
        data.num_eval_batches(val, seq_len=32, batch_size=8, max_batches=None)
    assert "2 windows of seq_len + 1 = 33 tokens, fewer than one eval batch of 8 (it needs 264 tokens): " \
        "hold out more with `fgc data --val-fraction`, or train without evaluation (--eval-every 0)" in str(err.value)


def test_new_scaffolds_a_project_that_lists_and_builds(tmp_path):
    proc = run_fgc("new", "proj", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proj = tmp_path / "proj"
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*") if p.is_file()) == [
        ".gitignore", "README.md", "configs/train.yaml", "data/corpus.txt", "meta.yaml",
    ]
    assert run_fgc("ls", cwd=proj).stdout == "configs/train.yaml: OK\n"
    run_fgc("build", "-p", ".", "train.yaml", "-o", "build", cwd=proj, check=True)  # default_config's project
    assert (proj / "build" / "train.py").is_file()
    # the same text every time
    run_fgc("new", tmp_path / "again", check=True)
    assert (tmp_path / "again" / "data" / "corpus.txt").read_bytes() == (proj / "data" / "corpus.txt").read_bytes()
    # never over anything
    proc = run_fgc("new", "proj", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (2, "proj: error: already exists: fgc new makes a new directory (or fills an empty one)\n")
    proc = run_fgc("new", "a b", cwd=tmp_path)
    assert proc.returncode == 2 and "a project's name is letters" in proc.stderr and not (tmp_path / "a b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "proj"]  # no staging left


@pytest.mark.slow
def test_the_new_project_trains_as_generated(tmp_path):
    run_fgc("new", tmp_path / "proj", check=True)
    proj = tmp_path / "proj"
    run_fgc("build", "configs/train.yaml", "-o", "build/", "-D", "max_steps=20", cwd=proj, check=True)
    proc = subprocess.run([sys.executable, "build/train.py"], cwd=proj, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (proj / "output" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 1.0 and (proj / "output" / "final" / "config.json").is_file()


def test_shell_completion_of_commands_and_a_configs_knobs():
    def complete(*words):
        env = dict(os.environ, COMP_WORDS=" ".join(("fgc",) + words), COMP_CWORD=str(len(words)), _FGC_COMPLETE="bash_complete")
        return subprocess.run([sys.executable, "-m", "fgc"], env=env, capture_output=True, text=True).stdout.split()

    assert complete("bu") == ["plain,build"]
    assert complete("build", str(EXAMPLE), "-D", "hidden") == ["plain,hidden_size="]
    knobs = complete("build", str(EXAMPLE), "-D", "")
    assert {"plain,lr=", "plain,trainer_type=", "plain,family="} <= set(knobs) and "plain,ns=" not in knobs
    assert complete("build", str(EXAMPLE), "-D", "lr=") == []  # a value: nothing to offer


def test_ls_examples_lists_every_example_and_a_fine_tune_needs_its_model_dir():
    proc = run_fgc("ls", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "examples/tiny_llama/train.yaml: OK" in lines
    assert "examples/hf_finetune/finetune.yaml: OK (needs -D model_dir=PATH)" in lines
    assert "examples/chat_finetune/finetune.yaml: OK (needs -D model_dir=PATH)" in lines
    # the journey examples (tests/test_examples.py trains them): every config of each is listed, OK
    for folder in ("variants", "optimizer_bakeoff", "pipeline", "fsdp2_tp", "diloco", "peak_memory"):
        configs = sorted((EXAMPLE.parent.parent / folder).glob("*.yaml"))
        assert configs, folder
        for config in configs:
            assert f"examples/{folder}/{config.name}: OK" in lines, proc.stdout
