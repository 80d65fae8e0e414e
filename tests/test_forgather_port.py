"""Forgather's trainer classes read as fgc's trainer settings (lowering/forgather_trainers.py), and
the ported Forgather project examples/forgather_port (docs/porting-from-forgather.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fgc.build import compile_config
from fgc_lowering.forgather_trainers import ARGUMENTS, TRAINER_KEYWORDS, Instead
from fgc.settings import DDPTrainer, PipelineTrainer

from conftest import REPO, run_fgc

PORT = REPO / "examples" / "forgather_port"
CORPUS = "\n".join(f"the {w} sat on the mat and looked at the {v} for a while." for w in ("cat", "dog", "owl", "fox") for v in ("moon", "sun", "rain", "sea"))


def write_config(tmp_path: Path, args: str, trainer: str = "", spec: str = "forgather.ml.trainer:Trainer",
                 args_spec: str = "forgather.ml.trainer:TrainingArguments", blocks: str = "") -> Path:
    """A child of fgc's lm/llama.yaml whose [trainer] block is written as Forgather writes it:
    TrainingArguments with ARGS (indented lines), a Forgather trainer with TRAINER lines."""
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "-- extends 'lm/llama.yaml'\n"
        "[config_metadata]\n== super()\n-- set ns.hidden_size = 32\n-- set ns.num_hidden_layers = 2\n"
        "-- set ns.intermediate_size = 64\n"
        "[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n"
        f"    data_dir: {json.dumps(str(shards))}\n"
        + blocks
        + "[trainer]\n"
        f"trainer_args: &trainer_args !singleton:{args_spec}@trainer_args\n"
        + args
        + f"trainer: &trainer !singleton:{spec}@trainer\n"
        "    args: *trainer_args\n"
        "    data: *data\n"
        + trainer
    )
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based line of PATH that contains TEXT."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def value(compiled, node_id: str, key: str):
    """The literal value of keyword KEY of call node NODE_ID."""
    node = compiled.ir.node(node_id)
    return compiled.ir.node(node.kwargs[key]).value


MAPPED_ARGS = """\
    output_dir: "ported_out"
    seed: 7
    max_steps: 37
    per_device_train_batch_size: 3
    gradient_accumulation_steps: 5
    per_device_eval_batch_size: 6
    max_eval_steps: 9
    logging_steps: 11
    logging_strategy: "steps"
    eval_strategy: "steps"
    eval_steps: 13
    save_strategy: "steps"
    save_steps: 17
    save_total_limit: 4
    max_grad_norm: 0.5
    torch_compile: true
    torch_compile_mode: "max-autotune"
    torch_compile_full_graph: true
    gradient_checkpointing: true
    use_cpu: true
"""


def test_mapped_arguments_reach_the_fgc_settings(tmp_path):
    path = write_config(tmp_path, MAPPED_ARGS)
    s = compile_config(path).ctx.settings
    assert type(s).__name__ == "BasicTrainer"
    assert (s.output_dir, s.seed, s.max_steps) == ("ported_out", 7, 37)
    # fgc's batch_size is the global batch of an optimizer step: per device x accumulation (1 rank)
    assert (s.batch_size, s.micro_batch_size) == (15, 3)
    assert (s.logging.eval_batch_size, s.logging.eval_batches) == (6, 9)
    assert (s.logging.log_every, s.logging.eval_every) == (11, 13)
    assert (s.checkpoint.save_every, s.checkpoint.keep_last_n) == (17, 4)
    assert s.grad_clip == 0.5
    assert (s.compile.enabled, s.compile.mode, s.compile.fullgraph) == (True, "max-autotune", True)
    assert s.activation_checkpointing.mode == "full"
    assert s.device == "cpu"
    # the data settings the port adds beside args pass through
    assert s.data.data_dir == str(tmp_path / "shards")


def test_mapped_values_keep_their_config_lines(tmp_path):
    path = write_config(tmp_path, MAPPED_ARGS)
    compiled = compile_config(path)
    program = compiled.ctx.program()
    assert program is not None
    train = compiled.ir.node(compiled.ir.targets["trainer"])
    assert train.spec == "fgc.settings:BasicTrainer"
    assert train.key_locs["max_steps"].line == line_of(path, "max_steps: 37")
    logging = compiled.ir.node(train.kwargs["logging"])
    assert logging.key_locs["log_every"].line == line_of(path, "logging_steps: 11")
    # the arguments node is gone: its values hang from the trainer
    assert "trainer_args" not in compiled.ir.targets


def test_forgather_defaults_where_they_differ_from_fgc(tmp_path):
    path = write_config(tmp_path, '    max_steps: 5\n')
    s = compile_config(path).ctx.settings
    # Forgather: no clipping, logging every 50 steps, checkpoints every 1000, 16 sequences a device,
    # no evaluation unless eval_strategy says steps
    assert s.grad_clip is None
    assert s.logging.log_every == 50
    assert s.checkpoint.save_every == 1000
    assert (s.batch_size, s.micro_batch_size) == (16, 16)
    assert s.logging.eval_every == 0


def test_save_strategy_no_and_seed(tmp_path):
    path = write_config(tmp_path, '    max_steps: 5\n    save_strategy: "no"\n    eval_strategy: "no"\n')
    s = compile_config(path).ctx.settings
    assert s.checkpoint.save_every == 0
    assert s.logging.eval_every == 0


def test_learning_rate_and_schedule_reach_optimizer_and_lr_scheduler(tmp_path):
    blocks = "[optimizer]\noptimizer: !partial:torch.optim:AdamW@optimizer\n    betas: !tuple [0.9, 0.95]\n[lr_scheduler]\n"
    args = (
        "    max_steps: 40\n    learning_rate: 0.005\n    weight_decay: 0.01\n    adam_epsilon: 1.0e-7\n"
        '    lr_scheduler_type: "cosine"\n    warmup_steps: 4\n'
    )
    compiled = compile_config(write_config(tmp_path, args, blocks=blocks))
    opt = compiled.ir.targets["optimizer"]
    assert (value(compiled, opt, "lr"), value(compiled, opt, "weight_decay"), value(compiled, opt, "eps")) == (0.005, 0.01, 1e-7)
    sched = compiled.ir.node(compiled.ir.targets["lr_scheduler"])
    assert sched.spec == "fgc_runtime.train:warmup_cosine"
    assert (value(compiled, sched.id, "warmup"), value(compiled, sched.id, "total")) == (4, 40)


def test_constant_schedule(tmp_path):
    args = '    max_steps: 40\n    lr_scheduler_type: "constant"\n'
    compiled = compile_config(write_config(tmp_path, args, blocks="[lr_scheduler]\n"))
    assert compiled.ir.node(compiled.ir.targets["lr_scheduler"]).spec == "fgc_runtime.train:constant"


def test_ddp_and_pipeline_trainers(tmp_path):
    trainer = "    parallel: !singleton:fgc.settings:DataParallelSettings\n        nproc: 4\n"
    path = write_config(tmp_path, "    max_steps: 5\n    per_device_train_batch_size: 2\n    gradient_accumulation_steps: 3\n",
                        trainer, spec="forgather.ml.trainer.accelerate:AccelTrainer",
                        args_spec="forgather.ml.trainer.accelerate:AccelTrainingArguments")
    s = compile_config(path).ctx.settings
    assert isinstance(s, DDPTrainer) and s.parallel.nproc == 4
    assert (s.batch_size, s.micro_batch_size) == (24, 2)  # 2 a device x 3 accumulations x 4 ranks

    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    path = write_config(pipe_dir, "    max_steps: 5\n    per_device_train_batch_size: 8\n    n_microbatches: 4\n",
                        "    parallel: !singleton:fgc.settings:PipelineSettings\n        nproc: 2\n        pipeline_degree: 2\n",
                        spec="forgather.ml.trainer.pipeline:PipelineTrainer",
                        args_spec="forgather.ml.trainer.pipeline:PipelineTrainingArguments")
    s = compile_config(path).ctx.settings
    assert isinstance(s, PipelineTrainer)
    assert (s.batch_size, s.parallel.microbatches) == (8, 4)


UNMAPPED = sorted(k for k, v in ARGUMENTS.items() if isinstance(v, Instead))


@pytest.mark.parametrize("arg", UNMAPPED)
def test_each_unmapped_argument_is_one_error_at_its_line(tmp_path, arg):
    path = write_config(tmp_path, f"    max_steps: 5\n    {arg}: 1\n")
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if ": error: " in l]
    assert errors == [
        f"{path}:{line_of(path, f'{arg}: 1')}: error: forgather.ml.trainer:TrainingArguments: argument "
        f"{arg!r} has no fgc equivalent; {ARGUMENTS[arg].text}"
    ]
    assert "Traceback" not in proc.stderr


TRAINER_ONLY = sorted(k for k, v in TRAINER_KEYWORDS.items() if isinstance(v, Instead))


def test_each_unmapped_trainer_keyword_is_one_error_at_its_line(tmp_path):
    lines = "".join(f"    {key}: 1\n" for key in TRAINER_ONLY)
    path = write_config(tmp_path, "    max_steps: 5\n", lines)
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if ": error: " in l]
    assert errors == [
        f"{path}:{line_of(path, f'    {key}: 1')}: error: forgather.ml.trainer:Trainer: argument {key!r} has no "
        f"fgc equivalent; {TRAINER_KEYWORDS[key].text}"
        for key in TRAINER_ONLY
    ]


def test_value_errors_name_the_argument(tmp_path):
    path = write_config(
        tmp_path,
        '    max_steps: -1\n    seed: -1\n    eval_steps: 10\n    learning_rate: 0.1\n    save_strategy: "epoch"\n',
    )
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    assert f"{path}:{line_of(path, 'max_steps: -1')}: error: forgather.ml.trainer:TrainingArguments: argument 'max_steps' -1 (train by epochs) has no fgc equivalent; write a positive max_steps" in proc.stderr
    assert f"{path}:{line_of(path, 'seed: -1')}: error:" in proc.stderr and "'seed' -1 (a random seed)" in proc.stderr
    assert f"{path}:{line_of(path, 'eval_steps: 10')}: error: forgather.ml.trainer:TrainingArguments: argument 'eval_steps' has no effect with eval_strategy \"no\" (Forgather's default)" in proc.stderr
    assert f"{path}:{line_of(path, 'learning_rate: 0.1')}: error: forgather.ml.trainer:TrainingArguments: argument 'learning_rate' has no effect: the optimizer sets lr at" in proc.stderr
    save_line = line_of(path, 'save_strategy: "epoch"')
    assert f"{path}:{save_line}: error: forgather.ml.trainer:TrainingArguments: argument 'save_strategy' 'epoch' has no fgc equivalent" in proc.stderr


def test_optimizer_factory_must_be_the_optimizer_target(tmp_path):
    path = write_config(tmp_path, "    max_steps: 5\n", "    optimizer_factory: *layer\n")
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    assert (f"{path}:{line_of(path, 'optimizer_factory: *layer')}: error: forgather.ml.trainer:Trainer: argument "
            "'optimizer_factory' must be the config's 'optimizer' target, which fgc reads") in proc.stderr


def test_the_port_example_builds_without_forgather_installed():
    # forgather is not importable here: the trainer classes are recognised, not imported
    assert subprocess.run([sys.executable, "-c", "import forgather"], capture_output=True).returncode != 0
    compiled = compile_config(PORT / "templates" / "configs" / "accum_10.yaml",
                              variables={"data_dir": "shards"})
    s = compiled.ctx.settings
    assert (s.max_steps, s.batch_size, s.micro_batch_size) == (20, 80, 8)
    assert (s.logging.log_every, s.logging.eval_every, s.checkpoint.save_every) == (1, 5, 10)


def test_port_example_configs_are_found_in_forgathers_layout():
    proc = run_fgc("ls", "-p", PORT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "examples/forgather_port/templates/configs/accum_10.yaml: OK",
        "examples/forgather_port/templates/configs/control.yaml: OK",
    ]


@pytest.mark.slow
def test_port_example_trains_end_to_end(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(8):
        (text / f"story{i}.txt").write_text(CORPUS + f"\nstory {i} ends here.\n")
    shards = tmp_path / "shards"
    run_fgc("data", text, "-o", shards, "--val-fraction", "0.25", check=True)
    build = tmp_path / "build"
    # the project's default data_dir, shards, is relative to where train.py runs (its README)
    proc = run_fgc("build", "-p", PORT, "control.yaml", "-o", build, "-D", "max_steps=8")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(build / "train.py"), "--output-dir", str(out), "--device", "cpu",
                          "--eval-every", "4"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert losses and all(math.isfinite(x) for x in losses)
    assert [l["step"] for l in lines if "eval_loss" in l] == [4, 8]
    assert (out / "final" / "config.json").is_file()
