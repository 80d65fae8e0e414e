"""A config's own train.py flags (its ``dynamic_args``, Forgather's shape): a declared NAME binds
``!var NAME`` at run time. train.py --help shows the flag, its value reaches the optimizer and the
lr schedule, a bad value is argparse's or a one-line error, and every mistake in a declaration
(or a flag whose value fgc itself reads at build time) is a build error at its line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import line_of, run_fgc, small_config, tree_bytes

OPTIMIZER = (
    "[optimizer]\n"
    "optimizer: !partial:torch.optim:AdamW@optimizer\n"
    "    lr: !var {name: lr, default: 1.0e-3}\n"
    "    weight_decay: 0.1\n"
)
LR_FLAG = (
    "dynamic_args:\n"
    "    lr:\n"
    '        names: "--lr"\n'
    "        type: float\n"
    '        help: "peak learning rate"\n'
)


def config(tmp_path: Path, optimizer: str = OPTIMIZER, flags: str = LR_FLAG, other: str = "") -> Path:
    """The small test config with OPTIMIZER and its dynamic_args FLAGS in its [optimizer] block,
    and OTHER blocks after it."""
    return small_config(tmp_path, extra=optimizer + flags + other)


def train(package: Path, run: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(package / "train.py"), "--output-dir", str(run), *map(str, args)],
        capture_output=True, text=True,
    )


def logged_lrs(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in lines if "lr" in r]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / "model.pt", weights_only=True)


def test_help_shows_the_flag_and_one_build_serves_every_value(tmp_path):
    cfg = config(tmp_path)
    run_fgc("build", cfg, "-o", tmp_path / "a", check=True)
    run_fgc("build", cfg, "-o", tmp_path / "b", "--no-smoke", check=True)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    proc = subprocess.run([sys.executable, str(tmp_path / "a" / "train.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    assert "the config's flags:" in lines
    assert "--lr LR               peak learning rate (default: 0.001)" in lines
    source = (tmp_path / "a" / "train.py").read_text()
    assert "torch.optim.AdamW, lr=flags.lr, weight_decay=0.1" in source
    explained = run_fgc("explain", cfg, check=True).stdout
    assert "  --lr (float, default 0.001): sets optimizer.lr; peak learning rate" in explained


def test_the_flag_value_reaches_the_optimizer_and_is_recorded_for_resume(tmp_path):
    pkg = tmp_path / "pkg"
    run_fgc("build", config(tmp_path), "-o", pkg, "--no-smoke", check=True)
    frozen, default = tmp_path / "frozen", tmp_path / "default"
    for run, extra in ((frozen, ("--lr", "0")), (default, ())):
        proc = train(pkg, run, "--max-steps", 2, "--log-every", 1, "--save-every", 1, *extra)
        assert proc.returncode == 0, proc.stderr
    assert logged_lrs(frozen) == [0.0, 0.0]
    assert logged_lrs(default)[0] == 1.0e-3
    # lr 0 (AdamW's weight decay is scaled by lr too): the weights never move
    first, second = weights(frozen, 1), weights(frozen, 2)
    assert all(torch.equal(first[k], second[k]) for k in first)
    moved = weights(default, 2)
    assert any(not torch.equal(first[k], moved[k]) for k in first)
    # the checkpoint records the flag's value; resuming with another says so
    state = torch.load(frozen / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=True)
    assert state["flags"] == {"lr": 0.0}
    proc = train(pkg, frozen, "--max-steps", 3, "--log-every", 1)
    assert proc.returncode == 0, proc.stderr
    assert "was written with lr=0.0 (this run: 0.001)" in proc.stdout


def test_a_bad_flag_value_is_one_error_line(tmp_path):
    pkg = tmp_path / "pkg"
    run_fgc("build", config(tmp_path), "-o", pkg, "--no-smoke", check=True)
    run = tmp_path / "run"
    proc = train(pkg, run, "--lr", "notafloat")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "train.py: error: argument --lr: invalid float value: 'notafloat'"
    # a value the optimizer refuses: its own check, before anything is written
    proc = train(pkg, run, "--lr", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --lr -1.0: Invalid learning rate: -1.0"
    assert "Traceback" not in proc.stderr and not run.exists()


def test_forgather_dlist_bool_choices_and_schedule_flags(tmp_path):
    optimizer = OPTIMIZER + "    amsgrad: !var {name: amsgrad}\n"
    flags = (
        "dynamic_args: !dlist\n"
        "    lr:\n"
        "        names: [--lr, -l]\n"
        "        type: float\n"
        "    amsgrad:\n"
        "        names: --amsgrad\n"
        "        type: bool\n"
        "        default: false\n"
        "    warmup:\n"
        "        names: --warmup\n"
        "        type: int\n"
        "        choices: [0, 1, 2]\n"
    )
    schedule = (
        "[lr_scheduler]\n"
        "lr_scheduler: !partial:fgc_runtime.train:warmup_cosine@lr_scheduler\n"
        "    warmup: !var {name: warmup, default: 1}\n"
        "    total: 3\n"
    )
    pkg = tmp_path / "pkg"
    # -D sets the value the package is built with: the flag's default
    run_fgc("build", config(tmp_path, optimizer, flags, schedule), "-o", pkg, "--no-smoke", "-D", "warmup=2", check=True)
    proc = subprocess.run([sys.executable, str(pkg / "train.py"), "--help"], capture_output=True, text=True)
    assert "--warmup {0,1,2}      the config's warmup (default: 2)" in [line.strip() for line in proc.stdout.splitlines()]
    source = (pkg / "train.py").read_text()
    assert "amsgrad=flags.amsgrad" in source and "warmup=flags.warmup" in source
    proc = train(pkg, tmp_path / "x", "--amsgrad", "maybe")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "train.py: error: argument --amsgrad: expected true or false, got 'maybe'"
    proc = train(pkg, tmp_path / "x", "--warmup", "5")
    assert proc.stderr.splitlines()[-1] == "train.py: error: argument --warmup: invalid choice: 5 (choose from 0, 1, 2)"
    run = tmp_path / "run"
    proc = train(pkg, run, "-l", "0.5", "--warmup", "0", "--amsgrad", "yes", "--max-steps", 1, "--log-every", 1)
    assert proc.returncode == 0, proc.stderr
    assert logged_lrs(run) == [0.5]  # no warmup: the peak at once


TRAINER_VAR = (
    "[checkpointing]\n"
    ".checkpoint: &checkpoint !singleton:fgc.settings:CheckpointSettings@checkpoint\n"
    "    save_every: !var {name: ckpt_every, default: 0}\n"
)
MODEL_VAR = (
    "[positions]\n"
    ".positions: &positions !singleton:fgc.components.rotary:RotaryEmbedding@positions\n"
    "    head_dim: 8\n"
    "    max_position_embeddings: 32\n"
    "    rope_theta: !var {name: theta, default: 10000.0}\n"
)

# (declarations after lr's, other blocks, the text of the line to blame, the message)
BUILD_ERRORS = {
    "unknown field": ("        nargs: 2\n", "", "nargs: 2", "dynamic arg 'lr': unknown field 'nargs'"),
    "bad type": (
        "    wd:\n        names: --wd\n        type: double\n", "", "type: double",
        "dynamic arg 'wd': type 'double' is not one of int, float, str, bool, path",
    ),
    "train.py's own flag": (
        "    steps:\n        names: [--max-steps]\n        type: int\n", "", "names: [--max-steps]",
        "dynamic arg 'steps': --max-steps is one of train.py's own flags",
    ),
    "duplicate flag": (
        "    lr2:\n        names: --lr\n        type: float\n", "", "names: --lr\n",
        "dynamic arg 'lr2': --lr is declared twice (also by 'lr')",
    ),
    "not an identifier": (
        "    my-lr:\n        names: --my-lr\n        type: float\n", "", "my-lr:",
        "dynamic arg 'my-lr': its name must be a Python identifier (it is the !var it binds)",
    ),
    "a template variable": (
        "    warmup_steps:\n        names: --warmup-steps\n        type: int\n", "", "warmup_steps:",
        "dynamic arg 'warmup_steps': no !var of this config reads it\n  hint: the templates read 'warmup_steps': "
        "fgc binds dynamic args to !var at run time; templates render at build time: use -D",
    ),
    "read by the trainer": (
        "    ckpt_every:\n        names: --ckpt-every\n        type: int\n", TRAINER_VAR, "save_every: !var",
        "!var ckpt_every is the train.py flag --ckpt-every, but the 'trainer' target reads it at build time "
        "to plan the training (the trainer settings); set it with -D ckpt_every=VALUE",
    ),
    "read by the model": (
        "    theta:\n        names: --theta\n        type: float\n", MODEL_VAR, "rope_theta: !var",
        "!var theta is the train.py flag --theta, but the 'model' target reads it at build time to build the "
        "model on the meta device and plan its shapes, parameters and parallel layout; set it with -D theta=VALUE",
    ),
}


@pytest.mark.parametrize("case", sorted(BUILD_ERRORS))
def test_build_errors(tmp_path, case):
    declarations, other, blamed, message = BUILD_ERRORS[case]
    cfg = config(tmp_path, flags=LR_FLAG + declarations, other=other)
    out = tmp_path / "out"
    proc = run_fgc("build", cfg, "-o", out, "--no-smoke")
    assert proc.returncode == 2, proc.stderr
    text = cfg.read_text()
    line = text[: text.index(blamed)].count("\n") + 1
    assert proc.stderr.startswith(f"{cfg}:{line}: error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_the_value_must_be_of_the_flags_type(tmp_path):
    flags = LR_FLAG.replace("type: float", "type: int")
    cfg = config(tmp_path, flags=flags)
    proc = run_fgc("build", cfg, "-o", tmp_path / "out", "--no-smoke")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"{cfg}:{line_of(cfg, 'lr: !var')}: error: !var lr is the train.py flag --lr of type int, "
        "but its value 0.001 is not a int"
    ), proc.stderr


def test_the_training_program_carries_the_flags_and_is_codegens_only_input(tmp_path):
    import inspect

    from fgc.build import compile_config
    from fgc.codegen.package import PackageBuilder

    cfg = config(tmp_path)
    dumps: list[str] = []
    compiled = compile_config(cfg, dump_after="select-kernels", dump=dumps.append)
    program = json.loads(dumps[1].split("\n", 1)[1])
    flag = program["flags"]["lr"]
    assert flag["flags"] == ["--lr"] and flag["type"] == "float" and flag["value"] == "0.001"
    assert flag["help"] == "peak learning rate" and flag["declared_at"].endswith(f"{cfg.name}:{line_of(cfg, 'dynamic_args:') + 1}")
    # the node the flag replaces is the optimizer's lr, whose callable the program names
    assert len(flag["nodes"]) == 1
    optimizer = [nid for nid, spec in program["callables"].items() if spec == "torch.optim:AdamW"]
    assert optimizer == [compiled.ir.targets["optimizer"]]
    assert flag["nodes"][0] in compiled.ir.reachable(optimizer[0])
    # codegen takes the program and nothing else: the same package as `fgc build` writes
    assert list(inspect.signature(PackageBuilder).parameters) == ["program"]
    files = PackageBuilder(compiled.program).build().files
    run_fgc("build", cfg, "-o", tmp_path / "pkg", "--no-smoke", check=True)
    for rel, data in files.items():
        assert (tmp_path / "pkg" / rel).read_bytes() == data, rel


def test_the_flags_train_py_declares_are_those_the_clash_check_reads(monkeypatch):
    """builtin_flags() reads train.py's own flags from its template (a config flag must not take
    one): every flag the golden package's parser has, and besides them only --weights (declared
    for a pretrained model alone). A flag added to the template in a shape the reading misses
    fails here."""
    import argparse
    import importlib.util

    from fgc_lowering.dynamic_args import builtin_flags

    golden = Path(__file__).resolve().parent.parent / "golden" / "tiny_llama"
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        return real(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.syspath_prepend(str(golden))
    monkeypatch.delitem(sys.modules, "model", raising=False)  # another package's, put back at the end
    try:
        spec = importlib.util.spec_from_file_location("golden_train", golden / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.parse_args([])
    finally:  # the golden package's model.py, which its train.py imported: no later test may see it
        sys.modules.pop("model", None)
    declared = set(parsers[0]._option_string_actions)
    assert declared <= set(builtin_flags())
    assert set(builtin_flags()) - declared == {"--weights"}
