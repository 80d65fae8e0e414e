"""Every example project of examples/ (issue #19) built and trained a few steps from the command
line, with the commands its README.md gives.

COMMANDS lists each example's commands exactly as its README shows them (the test checks that the
README holds each one verbatim), run from the repository root's layout in a temporary directory
(`examples` there is a link to the repository's). Two changes keep the run short: a training
command (`python .../train.py`, `torchrun ... train.py`) gets `--max-steps` appended (argparse
takes the last value, so it replaces a README's own), and `fgc`, `python` and `torchrun` are
this interpreter's. The examples run two at a time (one process pool for all of them, torchrun
launches on distinct ports); then each example's test checks its exit statuses, a finite loss
in every run's metrics.jsonl and the files its README promises.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO

STEPS = 2  # training steps per run: the first step is logged, the second takes an update

# torchao's low-bit optimizers compile their step with torch.compile on first use (about 30 s on
# a CPU); the READMEs run them with TorchDynamo off on a CPU
NO_COMPILE = "TORCHDYNAMO_DISABLE=1 "

COMMANDS = {
    "pipeline": [
        cmd
        for name in (
            "gpipe",
            "1f1b",
            "interleaved_1f1b",
            "looped_bfs",
            "interleaved_zero_bubble",
            "zbv_zero_bubble",
            "dualpipev",
        )
        for cmd in (
            f"fgc build examples/pipeline/{name}.yaml -o build/{name}",
            f"torchrun --nproc-per-node 2 build/{name}/train.py --output-dir out/{name}",
        )
    ],
    "variants": [
        "fgc build examples/variants/muon.yaml -o build/muon",
        "python build/muon/train.py --output-dir out/muon",
        "fgc build examples/variants/fsdp2.yaml -o build/fsdp2",
        "torchrun --nproc-per-node 2 build/fsdp2/train.py --output-dir out/fsdp2",
        "fgc build examples/variants/relu2_mlp.yaml -o build/relu2_mlp",
        "python build/relu2_mlp/train.py --output-dir out/relu2_mlp",
        "fgc build examples/variants/long_context.yaml -o build/long_context",
        "python build/long_context/train.py --output-dir out/long_context",
    ],
    "optimizer_bakeoff": [
        "fgc build examples/optimizer_bakeoff/adamw.yaml -o build/adamw",
        "python build/adamw/train.py --output-dir out/adamw",
        "fgc build examples/optimizer_bakeoff/sgd.yaml -o build/sgd",
        "python build/sgd/train.py --output-dir out/sgd",
        "fgc build examples/optimizer_bakeoff/adafactor.yaml -o build/adafactor",
        "python build/adafactor/train.py --output-dir out/adafactor",
        "fgc build examples/optimizer_bakeoff/adamw_bf16_sr.yaml -o build/adamw_bf16_sr",
        "python build/adamw_bf16_sr/train.py --output-dir out/adamw_bf16_sr",
        "fgc build examples/optimizer_bakeoff/muon.yaml -o build/muon",
        "python build/muon/train.py --output-dir out/muon",
        "fgc build examples/optimizer_bakeoff/adamw_8bit.yaml -o build/adamw_8bit",
        NO_COMPILE + "python build/adamw_8bit/train.py --output-dir out/adamw_8bit",
        "fgc plot out/* -o bakeoff.png",
    ],
    "fsdp2_tp": [
        "fgc build examples/fsdp2_tp/train.yaml -o build/fsdp2_tp",
        "torchrun --nproc-per-node 4 build/fsdp2_tp/train.py",
    ],
    "diloco": [
        "fgc build examples/diloco/train.yaml -o build/diloco",
        "torchrun --nproc-per-node 2 build/diloco/train.py",
    ],
    "peak_memory": [
        "fgc build examples/peak_memory/baseline.yaml -o build/baseline",
        "python build/baseline/train.py --output-dir runs/baseline",
        "fgc build examples/peak_memory/checkpointing.yaml -o build/checkpointing",
        "python build/checkpointing/train.py --output-dir runs/checkpointing",
        "fgc build examples/peak_memory/chunked_loss.yaml -o build/chunked_loss",
        "python build/chunked_loss/train.py --output-dir runs/chunked_loss",
        "fgc build examples/peak_memory/lowbit_optimizer.yaml -o build/lowbit_optimizer",
        NO_COMPILE + "python build/lowbit_optimizer/train.py --output-dir runs/lowbit_optimizer",
        "fgc plot runs/* --metric peak_mem_bytes -o peak_memory.png",
    ],
    "hf_finetune": [
        "python examples/chat_finetune/make_data.py work/ --count 10",
        "fgc data examples/tiny_llama/corpus.txt -o work/shards --tokenizer work/base",
        "fgc build examples/hf_finetune/finetune.yaml -o build/hf_finetune -D model_dir=work/base -D data_dir=work/shards",
        "python build/hf_finetune/train.py --output-dir out/hf_finetune",
    ],
    "tiny_llama": [
        "fgc build examples/tiny_llama/train.yaml -o build/tiny_llama",
        "torchrun --nproc-per-node 2 build/tiny_llama/train.py",
    ],
}

# the chat example's own test (test_chat_example.py) walks its README; forgather_port is a port
# of a Forgather project, tested by test_forgather_port.py

# examples whose commands need an optional package: the example is skipped without it
NEEDS = {"optimizer_bakeoff": "torchao", "peak_memory": "torchao"}

# a line the README promises in a command's output
PROMISED_OUTPUT = {"hf_finetune": ("python build/hf_finetune/train.py", "loaded the pretrained weights of ")}

# files the README promises after its commands, besides each run's metrics.jsonl and final/
PROMISED = {
    "optimizer_bakeoff": ["bakeoff.png"],
    "peak_memory": ["peak_memory.png"],
}


def free_port() -> int:
    """A TCP port no one listens on now (for one torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_training(argv: list[str]) -> bool:
    """Whether ARGV (a README command, split) runs a package's train.py."""
    return any(arg.endswith("train.py") for arg in argv) and argv[0] in ("python", "torchrun")


def output_dir(argv: list[str]) -> str:
    """The run directory of a training command: its --output-dir, else the package default."""
    return argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else "output"


def command_line(command: str, cwd: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run a README COMMAND here (a glob expands in CWD)."""
    words = shlex.split(command)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    head = {
        "fgc": [sys.executable, "-m", "fgc"],
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port())],
    }[words[0]]
    rest = []
    for word in words[1:]:
        rest.extend(sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else [word])
    if is_training(words):
        rest += ["--max-steps", str(STEPS)]
    return head + rest, env


def run_example(name: str, root: Path) -> dict:
    """Run example NAME's commands in ROOT/NAME, in order, stopping at the first failure."""
    cwd = root / name
    cwd.mkdir()
    (cwd / "examples").symlink_to(REPO / "examples")
    results = []
    for command in COMMANDS[name]:
        argv, env = command_line(command, cwd)
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        results.append((command, proc.returncode, proc.stdout + proc.stderr))
        if proc.returncode != 0:
            break
    return {"cwd": cwd, "results": results}


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Every example's commands, run two examples at a time (the torchrun launches with them)."""
    root = tmp_path_factory.mktemp("examples")
    names = [n for n in COMMANDS if n not in NEEDS or _importable(NEEDS[n])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_example, name, root) for name in names}
        return {name: future.result() for name, future in futures.items()}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_shows_the_commands_the_test_runs(name):
    readme = (REPO / "examples" / name / "README.md").read_text()
    for command in COMMANDS[name]:
        assert command in readme, f"{name}/README.md does not show: {command}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_example_builds_and_trains_as_its_readme_says(name, example_runs):
    if name not in example_runs:
        pytest.skip(f"needs {NEEDS[name]}")
    run = example_runs[name]
    for command, returncode, output in run["results"]:
        assert returncode == 0, f"{command} exited {returncode}:\n{output[-3000:]}"
    assert len(run["results"]) == len(COMMANDS[name])
    cwd = run["cwd"]
    for command in COMMANDS[name]:
        argv = shlex.split(command.removeprefix(NO_COMPILE))
        if not is_training(argv):
            continue
        run_dir = cwd / output_dir(argv)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r and "step" in r]
        assert losses and all(math.isfinite(x) for x in losses), (command, records)
        assert max(r["step"] for r in records if "step" in r) == STEPS, (command, records)
        assert (run_dir / "final" / "model.safetensors").is_file(), command
    if name in PROMISED_OUTPUT:
        prefix, line = PROMISED_OUTPUT[name]
        assert any(c.startswith(prefix) and line in out for c, _, out in run["results"]), line
    for promised in PROMISED.get(name, []):
        path = cwd / promised
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", promised
