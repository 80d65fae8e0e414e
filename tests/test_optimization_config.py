"""Optimizers and lr schedules selected in the config (-D optimizer=..., -D lr_scheduler=...,
-D budget_unit=tokens), what train.py does with them, and their errors at the config line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc
from fgc.build import compile_config
from fgc.codegen.package import PackageBuilder
from fgc.errors import FgcError
from fgc.frontend.render import LIBRARY_DIR

LIB_TRAIN = LIBRARY_DIR / "lm" / "train.yaml"


def train_py(**variables) -> str:
    compiled = compile_config(EXAMPLE, variables=variables)
    return PackageBuilder(compiled.program).build().files["train.py"].decode()


def errors(config=EXAMPLE, **variables) -> list[tuple[str, int, str]]:
    with pytest.raises(FgcError) as info:
        compile_config(config, variables=variables)
    return [(Path(d.loc.file).name, d.loc.line, d.message) for d in info.value.diagnostics]


def library_line(prefix: str) -> int:
    """The line of lm/train.yaml that starts with PREFIX (e.g. the line printing a kwarg)."""
    lines = LIB_TRAIN.read_text().splitlines()
    (n,) = [i for i, line in enumerate(lines, 1) if line.startswith(prefix)]
    return n


def test_default_is_adamw_and_cosine_in_steps():
    source = train_py()
    assert "torch.optim.AdamW, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1" in source
    assert "fgc_runtime.train.warmup_cosine, warmup=30, total=300" in source
    assert "param_groups(model, NO_WEIGHT_DECAY))" in source
    assert "lr_scheduler = lr_scheduler_factory(optimizer)\n" in source
    assert "tokens_per_step" not in source and "with_names" not in source  # nothing unused


def test_muon_wsd_in_tokens():
    source = train_py(optimizer="muon", lr_scheduler="wsd", budget_unit="tokens")
    assert "fgc_runtime.optim.MuonAdamW," in source
    assert "param_groups(model, NO_WEIGHT_DECAY, with_names=True)" in source
    # 30 and 300 steps of 16 x 128 tokens
    assert "fgc_runtime.train.warmup_stable_decay,\n    warmup=61440,\n    total=614400," in source
    assert 'budget_unit="tokens"' in source and 'decay_shape="1-sqrt"' in source
    assert "lr_scheduler_factory(\n        optimizer, tokens_per_step=GLOBAL_BATCH_SIZE * SEQ_LEN\n    )" in source


def test_sgd_and_the_infinite_schedule():
    source = train_py(optimizer="sgd", lr_scheduler="infinite", max_steps=100, warmup_steps=10)
    assert "torch.optim.SGD, lr=0.003, momentum=0.9, weight_decay=0.1" in source
    assert "fgc_runtime.train.infinite_lr," in source
    assert "cooldown=20," in source and "anneal=10," in source and "total=100," in source


def test_samples_and_tensorboard_are_constants_and_sampling_only_when_asked():
    plain = train_py()
    assert "TENSORBOARD = True" in plain and "SAMPLE_EVERY = 0" in plain
    assert "TextSampler" not in plain
    sampled = train_py(sample_every=50, sample_prompt="Once")
    assert "from fgc_runtime.sample import TextSampler, load_tokenizer" in sampled
    assert 'SAMPLE_PROMPT = "Once"  # -D sample_prompt=' in sampled
    assert "if text_sampler is not None and step % SAMPLE_EVERY == 0:" in sampled


@pytest.mark.parametrize(
    "variables, key, message",
    [
        ({"lr_scheduler": "wsd", "lr_decay_fraction": 1.5}, "    decay_fraction:", "decay_fraction must be in (0, 1], got 1.5"),
        ({"lr_scheduler": "infinite", "lr_constant_ratio": 0}, "    constant_ratio:", "constant_ratio must be in (0, 1], got 0"),
        ({"min_lr_ratio": 2}, "    min_lr_ratio:", "min_lr_ratio must be between 0 and 1, got 2"),
        ({"warmup_steps": -3}, "    warmup: {{ ns.warmup_steps", "warmup must be 0 or more, got -3"),
        ({"sample_every": -1}, "    sample_every:", "sample_every must be 0 or more, got -1"),
    ],
)
def test_nonsense_values_are_errors_at_the_line_that_prints_them(variables, key, message):
    assert errors(**variables) == [("train.yaml", library_line(key), message)]


def test_a_bad_decay_shape_or_budget_unit_is_a_type_error():
    (err,) = errors(lr_scheduler="wsd", lr_decay_shape="exp")
    assert err[1] == library_line("    decay_shape:")
    assert "must be one of 'linear', '1-sqrt', 'cosine', got 'exp'" in err[2]
    (err,) = errors(budget_unit="epochs")
    assert err[1] == library_line("    budget_unit:")
    assert "must be one of 'steps', 'tokens'" in err[2]


def test_muon_needs_a_trainer_with_whole_matrices():
    (err,) = errors(optimizer="muon", trainer_type="fsdp2")
    assert err[1] == library_line("optimizer: !partial:")
    assert "works with the basic and ddp trainers, not fsdp2" in err[2]


def test_errors_in_the_users_own_schedule_block(tmp_path):
    config = tmp_path / "sched.yaml"
    config.write_text(
        '-- extends "lm/train.yaml"\n'
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        f"    text_files: [{EXAMPLE.parent / 'corpus.txt'}]\n"
        "[lr_scheduler]\n"
        "lr_scheduler: !partial:fgc_runtime.train:warmup_stable_decay@lr_scheduler\n"
        "    warmup: 10\n"
        "    total: 100\n"
        "    decay_fraction: 0.0\n"
    )
    assert errors(config) == [("sched.yaml", 9, "decay_fraction must be in (0, 1], got 0.0")]


def test_unknown_optimizer_is_one_line_exit_2():
    proc = run_fgc("check", EXAMPLE, "-D", "optimizer=adam")
    assert proc.returncode == 2
    line = library_line('-- set _ = raise("optimizer ')
    assert proc.stderr.splitlines()[0] == (
        f"fgc/templates/lm/train.yaml:{line}: error: optimizer adam is not one of adamw, sgd, muon, adafactor"
    )
    assert "Traceback" not in proc.stderr


def test_fused_optimizer_selects_torchs_fused_step_and_trains_as_the_foreach_one(tmp_path):
    """-D fused_optimizer=true: torch's fused AdamW (or SGD) step, in the generated code; a short
    run's losses are the foreach step's to float rounding; elsewhere the knob is an error."""
    import json
    import os
    import subprocess
    import sys

    assert "torch.optim.AdamW, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1, fused=True" in train_py(fused_optimizer=True)
    assert "torch.optim.SGD, lr=0.003, momentum=0.9, weight_decay=0.1, fused=True" in train_py(
        optimizer="sgd", fused_optimizer=True
    )
    # with bf16_stochastic_round: fgc_runtime's AdamW step, compiled as one function
    source = train_py(precision="bf16", bf16_stochastic_round=True, fused_optimizer=True)
    assert "    fgc_runtime.optim.AdamW,\n" in source and "    bf16_stochastic_round=True,\n    fused=True,\n" in source
    for variables, why in (
        ({"optimizer": "muon"}, "with optimizer muon"),
        ({"optimizer": "adafactor"}, "with optimizer adafactor"),
    ):
        flags = [arg for k, v in variables.items() for arg in ("-D", f"{k}={v}")]
        proc = run_fgc("check", EXAMPLE, "-D", "fused_optimizer=true", *flags)
        assert proc.returncode == 2
        assert f"error: -D fused_optimizer: fused_optimizer has no effect {why}: it selects the fused AdamW or SGD step" in proc.stderr
    losses = {}
    # the foreach and fused steps on one process, and the fused step on FSDP2's sharded DTensors
    for name, trainer, fused in (("foreach", "basic", False), ("fused", "basic", True), ("fsdp2", "fsdp2", True)):
        pkg, run = tmp_path / f"pkg_{name}", tmp_path / f"run_{name}"
        run_fgc("build", EXAMPLE, "-o", pkg, "-D", f"trainer_type={trainer}", "-D", f"fused_optimizer={str(fused).lower()}",
                "--no-smoke", check=True)
        launcher = [sys.executable] if trainer == "basic" else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        proc = subprocess.run(
            [*launcher, str(pkg / "train.py"), "--output-dir", str(run), "--max-steps", "4", "--log-every", "1",
             "--eval-every", "0", "--device", "cpu"],
            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["fused"]) == 4
    assert losses["fused"] == pytest.approx(losses["foreach"], rel=1e-5)
    assert losses["fsdp2"] == pytest.approx(losses["fused"], rel=1e-5)
