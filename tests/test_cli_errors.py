"""The ``fgc`` command's user-facing behaviour (docs/status.md, the command table): ``FILE:LINE: error: MESSAGE`` on stderr,
exit status 2, no traceback; ``pp``, ``targets`` and ``-D``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fgc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fgc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def assert_user_error(result: subprocess.CompletedProcess, file: str, line: int | None) -> str:
    """Exit 2, first stderr line `FILE:LINE: error: ...`, no traceback; returns that first line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    first = result.stderr.split("\n")[0]
    where = re.escape(file) + (f":{line}" if line is not None else "")
    assert re.match(f"^{where}: error: ", first), first
    return first


# --- errors ------------------------------------------------------------------------------------


def test_undefined_variable_error(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\n## comment\nb: {{ nope }}\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    first = assert_user_error(result, "c.yaml", 3)
    assert first == "c.yaml:3: error: undefined: 'nope' is undefined"
    assert result.stdout == ""


def test_error_with_absolute_path_outside_the_working_directory(tmp_path):
    cfg = write(tmp_path / "cfg" / "c.yaml", "a: 1\n-- set _ = raise('stop')\n")
    (tmp_path / "elsewhere").mkdir()
    result = fgc("pp", str(cfg.resolve()), cwd=tmp_path / "elsewhere")
    first = assert_user_error(result, str(cfg.resolve()), 2)
    assert first.endswith("error: stop")


def test_error_in_parent_template_names_parent_and_chain(tmp_path):
    write(tmp_path / "base.yaml", "a: 1\n[x]\nb: {{ 1 + }}\n")
    write(tmp_path / "c.yaml", '## child\n-- extends "base.yaml"\n')
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_user_error(result, "base.yaml", 3)
    assert result.stderr.split("\n")[1:] == [
        "  in base.yaml:3, included or extended from c.yaml:2",
        "",
    ]


def test_error_under_a_computed_extends_traces_back_to_the_users_line(tmp_path):
    # the parent's name is computed ("lm/" ~ family), so only the render knows who extended it
    write(tmp_path / "lm" / "base.yaml", "a: 1\n[x]\nb: {{ raise('stop') }}\n")
    write(tmp_path / "mid.yaml", '-- extends "lm/" ~ kind ~ ".yaml"\n')
    write(tmp_path / "c.yaml", '## child\n-- set kind = "base"\n-- extends "mid.yaml"\n')
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_user_error(result, "lm/base.yaml", 3)
    assert result.stderr.split("\n")[1:] == [
        "  in lm/base.yaml:3, included or extended from mid.yaml:1",
        "  in mid.yaml:1, included or extended from c.yaml:3",
        "",
    ]


def test_yaml_error(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    result = fgc("targets", "c.yaml", cwd=tmp_path)
    assert_user_error(result, "c.yaml", 3)


def test_lowering_errors_all_reported_with_hint(tmp_path):
    write(
        tmp_path / "c.yaml",
        "optimizer: !partial:torch.optim:AdamW\n"
        "    lrr: 0.1\n"
        "model: !singleton:torch.nn:Linear\n"
        "    in_features: 3\n",
    )
    result = fgc("check", "c.yaml", cwd=tmp_path)
    first = assert_user_error(result, "c.yaml", 2)
    assert first == "c.yaml:2: error: torch.optim:AdamW has no parameter 'lrr'"
    lines = result.stderr.split("\n")
    assert lines[1] == "  hint: did you mean 'lr'?"
    assert (
        lines[2] == "c.yaml:3: error: torch.nn:Linear: missing a required argument: 'out_features'"
    )


def test_template_error_in_expression_is_a_user_error(tmp_path):
    write(tmp_path / "c.yaml", '-- extends "lm/train.yaml"\n')
    result = fgc("pp", "c.yaml", "-D", "max_steps=abc", cwd=tmp_path)
    lib = REPO / "fgc" / "templates" / "lm" / "train.yaml"
    line = next(
        i for i, t in enumerate(lib.read_text().split("\n"), 1) if "ns.max_steps // 10" in t
    )
    assert_user_error(result, str(lib), line)  # outside the working directory: absolute


def test_missing_config(tmp_path):
    result = fgc("pp", "missing.yaml", cwd=tmp_path)
    first = assert_user_error(result, "missing.yaml", None)
    assert first == "missing.yaml: error: no such config file"


def test_unknown_dump_after_pass(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\n")
    result = fgc("build", "c.yaml", "-o", "out", "--dump-after", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.split("\n")
    assert lines[0] == "<command line>: error: --dump-after: unknown pass 'nope'"
    assert lines[1] == (
        "  hint: passes: resolve-variables, resolve-callables, bind-arguments, check-types, validate-model, plan-training,"
            " select-kernels, check-optimization"
    )
    assert not (tmp_path / "out").exists()


def test_bad_define(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\n")
    result = fgc("pp", "c.yaml", "-D", "novalue", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("<command line>: error: -D 'novalue': expected NAME=VALUE")


def test_failed_build_leaves_no_output(tmp_path):
    write(tmp_path / "c.yaml", "model: !singleton:torch.nn:Nope\n")
    result = fgc("build", "c.yaml", "-o", "out", "--no-smoke", cwd=tmp_path)
    assert_user_error(result, "c.yaml", 1)
    assert not (tmp_path / "out").exists()


# --- pp, targets, -D ---------------------------------------------------------------------------


def test_pp_prints_rendered_yaml(tmp_path):
    write(tmp_path / "base.yaml", "-- set ns = namespace()\n[body]\na: 1 ## cut\nb: 'x ##y'\n")
    write(
        tmp_path / "c.yaml",
        '-- extends "base.yaml"\n[body]\n== super()\nc: {{ 2 * 3 }}  # kept\n',
    )
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a: 1\nb: 'x ##y'\n\nc: 6  # kept\n"
    assert result.stderr == ""


def test_targets_lists_targets(tmp_path):
    write(
        tmp_path / "c.yaml",
        ".shared: &s !factory:torch.nn:ReLU\n"
        "model: !singleton:torch.nn:Linear [2, 3]\n"
        "act: *s\n"
        "opts:\n"
        "  lr: 1\n"
        "n: 3\n",
    )
    result = fgc("targets", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == [
        "model\t!singleton:torch.nn:Linear\tc.yaml:2",
        "act\t!factory:torch.nn:ReLU\tc.yaml:1",
        "opts\tdict\tc.yaml:5",
        "n\tvalue\tc.yaml:6",
        "",
    ]


def test_define_values_are_yaml(tmp_path):
    write(
        tmp_path / "c.yaml",
        "lr: {{ lr }}\nlr_is_float: {{ lr is float }}\nname: {{ name }}\n"
        "flag: {{ flag }}\nsizes: {{ sizes }}\nquoted: {{ quoted }}\n",
    )
    defines = ["lr=1e-4", "name=yes", "flag=true", "sizes=[1, 2]", "quoted='0x10'"]
    result = fgc("pp", "c.yaml", *[a for d in defines for a in ("-D", d)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # strings from -D are data: printed quoted where YAML would read them as something else
    assert result.stdout.split("\n") == [
        "lr: 0.0001",
        "lr_is_float: True",
        "name: 'yes'",
        "flag: True",
        "sizes: [1, 2]",
        "quoted: '0x10'",
        "",
    ]


def test_a_define_with_a_merge_key_is_refused(tmp_path):
    write(tmp_path / "c.yaml", "a: {{ a | toyaml }}\n")
    merged = fgc("pp", "c.yaml", "-D", "a={<<: {b: 1}}", cwd=tmp_path)
    assert merged.returncode == 2
    assert merged.stderr.splitlines()[0] == (
        "<command line>: error: -D a: a merge key '<<' is not allowed in a value (it has no anchors to merge)"
    )
    quoted = fgc("pp", "c.yaml", "-D", 'a={"<<": 1}', cwd=tmp_path)  # a quoted key is a key
    assert (quoted.returncode, quoted.stdout) == (0, "a: {'<<': 1}\n"), quoted.stderr


def test_define_binds_var_through_the_cli(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: !var n\n")
    result = fgc("check", "c.yaml", "-D", "n=3", cwd=tmp_path)
    # the var binds; the config is then reported for lacking training targets, at the config
    first = assert_user_error(result, "c.yaml", None)
    assert "needs the target(s) 'model', 'optimizer', 'trainer'" in first
    result = fgc("check", "c.yaml", cwd=tmp_path)
    assert_user_error(result, "c.yaml", 2)


def test_build_with_dump_after(tmp_path):
    write(
        tmp_path / "train.yaml",
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.hidden_size = 32\n"
        "-- set ns.num_hidden_layers = 1\n"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        "    data_dir: tokens\n",
    )
    result = fgc(
        "build",
        "train.yaml",
        "-o",
        "out",
        "--no-smoke",
        "--dump-after",
        "resolve-variables",
        "-D",
        "max_steps=3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# IR after resolve-variables: ")
    assert "python out/train.py" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "fgc-build"
    assert (tmp_path / "out" / "train.py").is_file()
    assert "max_steps: 3" in (tmp_path / "out" / "config.yaml").read_text()
