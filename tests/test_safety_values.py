"""Values that would fail or do nothing at run time are build errors at their line (issue #13, item 13).

Sizes, counts, cadences and rates have ranges: the trainer settings carry them in their annotations
(``Annotated[int, Range(ge=1)]``, checked by the check-types pass, and again by plan-training for
values the config computes), the model's sizes are checked by name in validate-model, and the
optimizer is built once on a dummy parameter so that its own checks run at build time.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import EXAMPLE, line_of, run_fgc, small_config
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.frontend.render import LIBRARY_DIR
from fgc_lowering.types import Range, range_violation, value_ok

LIB_TRAIN = LIBRARY_DIR / "lm" / "train.yaml"


def diagnostics(config=EXAMPLE, **variables):
    with pytest.raises(FgcError) as info:
        compile_config(config, variables=variables)
    return info.value.diagnostics


def library_line(prefix: str) -> int:
    """The line of lm/train.yaml that starts with PREFIX (the line printing a kwarg)."""
    lines = LIB_TRAIN.read_text().splitlines()
    (n,) = [i for i, line in enumerate(lines, 1) if line.startswith(prefix)]
    return n


@pytest.mark.parametrize(
    "name, value, printed_at, message",
    [
        ("hidden_size", 0, "    hidden_size:", "hidden_size must be at least 1, got 0"),
        ("num_hidden_layers", -1, "    num_hidden_layers:", "num_hidden_layers must be at least 1, got -1"),
        ("intermediate_size", 0, "    intermediate_size:", "intermediate_size must be at least 1, got 0"),
        ("lr", -1, "    lr:", "optimizer: Invalid learning rate: -1"),
        ("lr", math.nan, "    lr:", "optimizer: Invalid learning rate: nan"),
        ("weight_decay", -0.5, "    weight_decay:", "optimizer: Invalid weight_decay value: -0.5"),
        ("log_every", -1, "    log_every:", "log_every must be 0 or more, got -1"),
        ("eval_every", -1, "    eval_every:", "eval_every must be 0 or more, got -1"),
        ("max_steps", 0, "    max_steps:", "max_steps must be at least 1, got 0"),
        ("seed", -3, "    seed:", "seed must be 0 or more and at most 9223372036854775807, got -3"),
        ("rms_norm_eps", math.inf, "    eps:", "eps must be 0 or more, got inf"),
    ],
)
def test_a_value_out_of_range_is_an_error_at_the_line_that_uses_it(name, value, printed_at, message):
    found = [d for d in diagnostics(**{name: value}) if d.message == message]
    assert found, [d.message for d in diagnostics(**{name: value})]
    (d,) = found
    assert Path(d.loc.file) == LIB_TRAIN and d.loc.line == library_line(printed_at)


def test_the_cli_says_which_d_set_it_in_one_line(tmp_path):
    proc = run_fgc("build", EXAMPLE, "-o", tmp_path / "out", "-D", "log_every=-1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.endswith(f"lm/train.yaml:{library_line('    log_every:')}: error: log_every must be 0 or more, got -1")
    assert "hint: the value was set by -D log_every=-1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_value_set_in_a_child_config_points_at_that_line(tmp_path):
    path = small_config(tmp_path, extra=(
        "[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n"
        "    label_smoothing: 1.5\n    z_loss: -0.1\n    chunk_size: 0\n"
    ))
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    # independent errors, all reported, each at its own line
    for text, message in (
        ("label_smoothing: 1.5", "label_smoothing must be 0 or more and less than 1, got 1.5"),
        ("z_loss: -0.1", "z_loss must be 0 or more, got -0.1"),
        ("chunk_size: 0", "chunk_size must be at least 1, got 0"),
    ):
        assert f"cfg.yaml:{line_of(path, text)}: error: {message}" in proc.stderr


def test_a_computed_value_out_of_range_is_caught_when_the_settings_are_built(tmp_path):
    # check-types sees only the values a config writes; plan-training checks the built settings
    path = small_config(tmp_path, extra=(
        "[logging]\n.logging: &logging !singleton:fgc.settings:LoggingSettings@logging\n"
        "    log_every: !singleton:operator:neg [3]\n"
    ))
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert f"cfg.yaml:{line_of(path, 'log_every:')}: error: log_every must be 0 or more, got -3" in proc.stderr


def test_values_in_range_still_build():
    compiled = compile_config(
        EXAMPLE, variables={"log_every": 0, "eval_every": 0, "lr": 0.0, "seed": 0, "grad_clip": math.inf}
    )
    s = compiled.ctx.settings
    assert (s.logging.log_every, s.logging.eval_every, s.seed, s.grad_clip) == (0, 0, 0, math.inf)


@pytest.mark.parametrize(
    "bounds, inside, outside, words",
    [
        (Range(ge=1), [1, 2, 10**12], [0, -1, math.nan], "at least 1"),
        (Range(ge=0), [0, 0.0, 3.5], [-1, -1e-9, math.inf, math.nan], "0 or more"),
        (Range(gt=0), [1e-12, 7], [0, 0.0, -2, math.nan], "more than 0"),
        (Range(ge=0, lt=1), [0, 0.5], [1, 1.0, -0.1, math.nan], "0 or more and less than 1"),
        (Range(gt=0, finite=False), [math.inf, 1.0], [0, -math.inf, math.nan], "more than 0"),
    ],
)
def test_range(bounds, inside, outside, words):
    assert all(bounds.contains(v) for v in inside)
    assert not any(bounds.contains(v) for v in outside)
    assert bounds.describe() == words


def test_range_violation_tells_range_from_type():
    from typing import Annotated, Optional

    hint = Optional[Annotated[int, Range(ge=1)]]
    assert value_ok(None, hint) and value_ok(3, hint)
    assert not value_ok(0, hint) and range_violation(0, hint) == Range(ge=1)
    assert not value_ok("3", hint) and range_violation("3", hint) is None  # a type error, not a range one
    assert not value_ok(True, hint) and range_violation(True, hint) is None


def test_train_py_flags_keep_the_same_ranges(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pkg"
    run_fgc("build", small_config(tmp_path), "-o", out, "--no-smoke", check=True)
    for flag, value, message in (
        ("--log-every", "-1", "argument --log-every: expected a whole number at least 0, got -1"),
        ("--max-steps", "0", "argument --max-steps: expected a whole number at least 1, got 0"),
        ("--seed", "x", "argument --seed: expected a whole number, got 'x'"),
    ):
        proc = subprocess.run(
            [sys.executable, str(out / "train.py"), flag, value, "--output-dir", str(tmp_path / "run")],
            capture_output=True, text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[-1].endswith(message)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
