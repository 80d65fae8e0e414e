"""Fast builds (issue #15, item 6): what a command imports and how often a build does each step.

These assert outcomes (which modules a process imported, how many times a step ran, what the
smoke check reports), never times; benchmarks/build.py measures the times.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, REPO, tree_bytes

# Runs `fgc ARGS` in this process and prints, after it exits, which heavy modules it imported.
# (fgc.cli.main, not the console script `run`, which ends the process with os._exit)
PROBE = r"""
import sys
HEAVY = ("torch", "torch._dynamo", "fgc_lowering", "libcst", "black", "transformers")
sys.argv = ["fgc"] + sys.argv[1:]
from fgc.cli import main
try:
    main(prog_name="fgc")
finally:
    print("IMPORTED " + " ".join(m for m in HEAVY if m in sys.modules), file=sys.stderr)
"""


def probe(*args, cwd=REPO) -> tuple[int, set[str], str]:
    """Run `fgc ARGS` in a fresh process: (exit status, heavy modules imported, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, capture_output=True, text=True
    )
    line = next(l for l in proc.stderr.splitlines() if l.startswith("IMPORTED"))
    return proc.returncode, set(line.split()[1:]), proc.stderr


def imported_after(statement: str) -> set[str]:
    """The heavy modules a fresh process has imported after running STATEMENT."""
    code = f"{statement}\nimport sys\nprint(' '.join(m for m in ('torch', 'fgc_lowering', 'libcst', 'black') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_cli_and_the_driver_imports_no_torch():
    assert imported_after("import fgc.cli") == set()
    # the driver imports lowering (and with it torch) only when a config gets that far
    assert imported_after("import fgc.build") == set()


def test_pp_and_targets_import_no_torch():
    for command in ("pp", "targets"):
        status, imported, stderr = probe(command, EXAMPLE)
        assert status == 0, stderr
        assert imported == set(), (command, imported)


@pytest.fixture
def broken_template(tmp_path) -> Path:
    config = tmp_path / "broken.yaml"
    config.write_text('-- extends "lm/train.yaml"\n[trainer]\n.x: {{ no_such_variable.field }}\n')
    return config


def test_a_template_error_is_reported_before_torch_is_imported(tmp_path, broken_template):
    for args in (("build", broken_template, "-o", tmp_path / "out"), ("check", broken_template)):
        status, imported, stderr = probe(*args)
        assert status == 2
        assert stderr.splitlines()[0].startswith(f"{broken_template}:3: error: undefined:"), stderr
        assert "torch" not in imported and "fgc_lowering" not in imported, (args, imported)
    assert not (tmp_path / "out").exists()


def test_build_does_not_import_torch_dynamo(tmp_path):
    # constructing the optimizer on a dummy parameter used to import torch._dynamo (over a second)
    status, imported, stderr = probe("build", EXAMPLE, "-o", tmp_path / "out")
    assert status == 0, stderr
    assert "torch" in imported and "torch._dynamo" not in imported
    assert (tmp_path / "out" / "train.py").is_file()


def test_optimizer_and_schedule_checks_still_run_without_dynamo():
    status, imported, stderr = probe("check", EXAMPLE, "-D", "lr=-1")
    assert status == 2 and "torch._dynamo" not in imported
    assert "error: optimizer: Invalid learning rate: -1" in stderr.splitlines()[0]
    # the schedule's own argument check, run on the dummy optimizer
    status, imported, stderr = probe("check", EXAMPLE, "-D", "min_lr_ratio=2")
    assert status == 2 and "torch._dynamo" not in imported
    assert "error: min_lr_ratio must be between 0 and 1, got 2" in stderr.splitlines()[0], stderr


def test_without_dynamo_leaves_torch_as_it_was():
    code = (
        "import sys, torch\n"
        "from fgc_lowering.construct import without_dynamo\n"
        "fn = torch.optim.Optimizer.add_param_group.__wrapped__\n"
        "with without_dynamo():\n"
        "    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)\n"
        "    inside = 'torch._dynamo' in sys.modules\n"
        "print(inside, hasattr(fn, '__dynamo_disable'), opt.param_groups[0]['lr'])\n"
        "torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    # inside: no dynamo; after: the method is torch's again, and imports dynamo as torch does
    assert out.stdout.split() == ["False", "False", "0.5", "True"]


def _counting(monkeypatch, owner, name, calls: list):
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_one_build_generates_the_package_once_and_builds_the_model_once(tmp_path, monkeypatch):
    import fgc.codegen.package as package
    import fgc_lowering.construct as construct
    from fgc.cli import main

    calls: list[str] = []
    for name in ("build", "model_py", "train_py"):
        _counting(monkeypatch, package.PackageBuilder, name, calls)
    _counting(monkeypatch, package, "format_python", calls)
    built = []
    real_construct = construct.construct

    def counting_construct(ir, ctx, node_id):
        if node_id == ir.targets["model"]:
            built.append(node_id)
        return real_construct(ir, ctx, node_id)

    monkeypatch.setattr(construct, "construct", counting_construct)
    result = CliRunner().invoke(main, ["build", str(EXAMPLE), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # black formats model.py, train.py and generate.py once each
    assert sorted(calls) == ["build", "format_python", "format_python", "format_python", "model_py", "train_py"]
    # the meta model lowering built serves hf_config.json too (the smoke check builds model.py's)
    assert len(built) == 1
    assert (tmp_path / "out" / "hf_config.json").is_file()


def test_each_template_is_parsed_and_compiled_once_per_render(monkeypatch):
    import jinja2.compiler
    import jinja2.parser

    from fgc.frontend.environment import FgcEnvironment
    from fgc.frontend.render import render

    parsed: list[str] = []
    generators: list[str] = []
    real = jinja2.parser.Parser.__init__
    real_generator = jinja2.compiler.CodeGenerator.__init__

    def counting(self, environment, source, name=None, filename=None, state=None):
        parsed.append(source)
        real(self, environment, source, name, filename, state)

    def counting_generator(self, *args, **kwargs):
        generators.append(type(self).__name__)
        real_generator(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.parser.Parser, "__init__", counting)
    monkeypatch.setattr(jinja2.compiler.CodeGenerator, "__init__", counting_generator)
    rendered = render(EXAMPLE)
    assert parsed and len(parsed) == len(set(parsed))
    # each template's code is generated once: the names it reads are gathered then, not by
    # jinja2.meta generating it again
    assert generators == ["_CodeGenerator"] * len(parsed)
    # the names the templates read are those jinja2.meta finds on a second parse of each
    monkeypatch.setattr(FgcEnvironment, "_parse", jinja2.Environment._parse)
    again = render(EXAMPLE)
    assert rendered.referenced == again.referenced and "lr" in rendered.referenced
    assert rendered.text == again.text


def test_smoke_check_reports_a_file_that_does_not_compile(tmp_path):
    from fgc.codegen.smoke import smoke_check
    from fgc.errors import Location

    (tmp_path / "model.py").write_text("def build_model(device=None):\n    return None\n")
    (tmp_path / "train.py").write_text("def broken(:\n")
    with pytest.raises(RuntimeError, match="generated file train.py does not compile"):
        smoke_check(tmp_path, Location("cfg.yaml", 1))


def test_smoke_check_compiles_a_runtime_file_unless_it_is_the_runtime_module_it_copies(tmp_path, monkeypatch):
    import builtins

    from fgc.codegen.package import RUNTIME_DIR
    from fgc.codegen.smoke import smoke_check
    from fgc.errors import Location

    (tmp_path / "model.py").write_text("def build_model(device=None):\n    return None\n")
    (tmp_path / "fgc_runtime").mkdir()
    (tmp_path / "fgc_runtime" / "errors.py").write_bytes((RUNTIME_DIR / "errors.py").read_bytes())
    (tmp_path / "fgc_runtime" / "log.py").write_text("x = 1\n")  # not the runtime's log.py
    compiled: list[str] = []
    real = builtins.compile

    def counting(source, filename, *args, **kwargs):
        if Path(str(filename)).is_relative_to(tmp_path):
            compiled.append(Path(filename).relative_to(tmp_path).as_posix())
        return real(source, filename, *args, **kwargs)

    monkeypatch.setattr(builtins, "compile", counting)
    smoke_check(tmp_path, Location("cfg.yaml", 1))
    # model.py twice: the check, then running it
    assert compiled == ["fgc_runtime/log.py", "model.py", "model.py"]
    # a changed copy that does not compile is still an error
    (tmp_path / "fgc_runtime" / "errors.py").write_text("def broken(:\n")
    with pytest.raises(RuntimeError, match="generated file errors.py does not compile"):
        smoke_check(tmp_path, Location("cfg.yaml", 1))


def test_smoke_check_reports_a_model_that_does_not_build_at_its_callable(tmp_path):
    from fgc.codegen.smoke import smoke_check
    from fgc.errors import FgcError, Location

    (tmp_path / "model.py").write_text(
        "class Block:\n"
        "    def __init__(self, width):\n"
        "        raise ValueError(f'width {width} is odd')\n\n"
        "def build_model(device=None):\n"
        "    return Block(width=3)\n"
    )
    with pytest.raises(FgcError) as info:
        smoke_check(tmp_path, Location("cfg.yaml", 1), {"Block": Location("cfg.yaml", 7)})
    assert info.value.diagnostics[0].format().splitlines()[0] == (
        "cfg.yaml:7: error: the model does not build: ValueError: width 3 is odd"
    )


def test_benchmark_states_the_goal_and_the_stages():
    out = subprocess.run(
        [sys.executable, "benchmarks/build.py", "--repeat", "1"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[-1].startswith("goal: build <= 1.5x torch import")
    assert lines[-1].split()[-1] in ("PASS", "FAIL")
    for stage in ("import torch", "render", "lower", "codegen: the whole package, once", "smoke check"):
        assert any(stage in line for line in lines), stage
    assert not any("codegen again" in line for line in lines)


def test_black_runs_once_per_source_in_a_process(monkeypatch, tmp_path):
    import black

    monkeypatch.setenv("FGC_CACHE_DIR", str(tmp_path / "cache"))  # empty: nothing met before

    import fgc.codegen.package as package

    runs: list[str] = []
    real = black.format_str

    def counting(source, *, mode):
        runs.append(source)
        return real(source, mode=mode)

    monkeypatch.setattr(black, "format_str", counting)
    source = "x = {'a':1}\n# fast-build test source\n"
    assert package.format_python(source) == package.format_python(source) == 'x = {"a": 1}\n# fast-build test source\n'
    assert runs == [source]


def test_a_command_runs_without_the_cyclic_collector_and_gives_it_back():
    """fgc.cli.command pauses the cyclic garbage collector for a command (a third of a cold
    build) and restores it after, on success and on a user error alike."""
    import gc

    import click

    from fgc.cli import command
    from fgc.errors import FgcError

    seen = []

    @click.command()
    @click.option("--debug", is_flag=True)
    @click.option("--fail", is_flag=True)
    @command
    def probe(debug, fail):
        seen.append(gc.isenabled())
        if fail:
            raise FgcError("probe failed")

    assert gc.isenabled()
    assert CliRunner().invoke(probe, []).exit_code == 0
    assert CliRunner().invoke(probe, ["--fail"]).exit_code == 2
    assert seen == [False, False] and gc.isenabled()


# -- black in a second process (fgc/codegen/black_worker.py) ----------------------------------------
def test_the_console_script_formats_in_a_black_worker_and_builds_the_same_package(tmp_path):
    """A cold build by the console script never imports black itself (its worker does), and
    writes the package an in-process build writes."""
    console = PROBE.replace("from fgc.cli import main", "import fgc.cli\nfgc.cli._CONSOLE_SCRIPT = True\nfrom fgc.cli import main")
    env = dict(os.environ, FGC_CACHE_DIR="off")
    proc = subprocess.run(
        [sys.executable, "-c", console, "build", str(EXAMPLE), "-o", str(tmp_path / "worker")],
        cwd=REPO, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(next(l for l in proc.stderr.splitlines() if l.startswith("IMPORTED")).split()[1:])
    assert "torch" in imported and "black" not in imported
    status, _, stderr = probe("build", EXAMPLE, "-o", tmp_path / "inline")  # black in-process
    assert status == 0, stderr
    assert tree_bytes(tmp_path / "worker") == tree_bytes(tmp_path / "inline")


def test_the_black_worker_never_runs_code_from_the_current_directory(tmp_path):
    """The `fgc` console script, run in a directory that holds a black.py: the worker imports
    black from fgc's own module path, as the command does, never the directory's file."""
    console = Path(sys.executable).parent / "fgc"
    if not console.is_file():
        pytest.skip("no fgc console script beside this interpreter")
    (tmp_path / "black.py").write_text("open('RAN', 'w').write('the directory black.py ran')\n")
    env = dict(os.environ, FGC_CACHE_DIR="off")
    proc = subprocess.run([str(console), "build", str(EXAMPLE), "-o", "out"], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "RAN").exists()
    assert (tmp_path / "out" / "train.py").read_text().startswith('"""Trainer for')


@pytest.fixture
def worker(monkeypatch):
    from fgc.codegen import black_worker

    monkeypatch.setattr(black_worker, "_cores", lambda: 2)  # a worker even on one core
    with black_worker.running() as w:
        assert w is not None and black_worker.current() is w
        yield w
    assert black_worker.current() is None and w.proc is None


def test_the_black_worker_formats_and_answers_none_for_what_black_refuses(worker):
    import black

    from fgc.codegen.black_worker import mode

    source = (REPO / "runtime" / "errors.py").read_text(encoding="utf-8").replace("    ", "  ")
    assert worker.format(source) == black.format_str(source, mode=mode(black))
    assert worker.format("def broken(:\n") is None
    assert worker.format("x=[1,\n2]\n") == "x = [1, 2]\n"  # still serving
    proc = worker.proc
    worker.close()
    assert proc.returncode is not None  # stopped and collected
    assert worker.format("x=1\n") is None


def test_format_python_raises_blacks_error_and_survives_a_dead_worker(worker, monkeypatch):
    import black

    from fgc.codegen import package

    monkeypatch.setenv("FGC_CACHE_DIR", "off")
    package.format_python.cache_clear()
    try:
        with pytest.raises(black.InvalidInput):
            package.format_python("def broken(:\n")
        worker.proc.kill()
        worker.proc.wait()
        assert package.format_python("y=2\n") == "y = 2\n"  # formatted in this process
        assert worker.proc is None
    finally:
        package.format_python.cache_clear()


def test_a_black_worker_of_another_black_version_is_not_used(worker, monkeypatch):
    from fgc.codegen import black_worker

    monkeypatch.setattr(black_worker, "black_version", lambda: "0.0")  # this process's black
    assert worker.format("x=1\n") is None and worker.proc is None
