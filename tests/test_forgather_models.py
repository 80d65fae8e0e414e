"""Model projects as Forgather writes them (issue #17, item 4): relative specs
(``!partial:.layers:DecoderBlock``) found through the config's ``submodule_searchpath``, and a
model assembled from several modules of the project that import each other relatively
(``from .layers import RMSNorm``, ``from . import attention``), vendored into one ``model.py``.

The fixture, tests/fixtures/forgather/modelsrc_project/, is a tiny causal LM in Forgather's
``modelsrc`` style: ``modelsrc/tiny_lm/{config,layers,attention,model}.py``, where layers.py and
attention.py import each other and both define a ``_helper``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import black
import torch

from conftest import REPO, SMALL_CORPUS, line_of, run_fgc
from fgc_lowering.specs import resolve_spec

FIXTURE = REPO / "tests" / "fixtures" / "forgather" / "modelsrc_project"
MODELSRC = Path("modelsrc") / "tiny_lm"


def _project(tmp_path: Path) -> Path:
    """A copy of the fixture project with its corpus, under TMP_PATH/project."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURE, project, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "corpus.txt").write_text(SMALL_CORPUS)
    return project


def _imported_modules(source: str) -> set[str]:
    """The top-level modules a Python source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, ast.unparse(node)  # no relative import survives vendoring
            found.add(node.module.split(".")[0])
    return found


def test_a_modelsrc_project_builds_into_one_model_py_that_needs_only_torch(tmp_path):
    project = _project(tmp_path)
    proc = run_fgc("build", "train.yaml", "-o", "build", cwd=project)
    assert proc.returncode == 0, proc.stderr
    model_py = (project / "build" / "model.py").read_text()

    # every definition the model uses, from each of the project's four modules
    for definition in (
        "class TinyLMConfig:",  # config.py
        "class TinyCausalLM(nn.Module):",  # model.py
        "class DecoderBlock(nn.Module):",  # layers.py, named by the config
        "class MLP(nn.Module):",  # layers.py, used by DecoderBlock
        "class RMSNorm(nn.Module):",  # layers.py, imported by model.py and attention.py
        "class CausalAttention(nn.Module):",  # attention.py, used as attention.CausalAttention
    ):
        assert model_py.count(definition) == 1, definition
    for module in ("config", "layers", "attention", "model"):
        assert f"# ---- vendored from {(MODELSRC / module).as_posix()}.py" in model_py
    # the two modules' _helper are kept apart, each renamed where its module uses it
    assert "def _helper(" not in model_py
    assert "def _helper_layers(x, eps=1e-6):" in model_py
    assert "return _helper_layers(x) * self.weight" in model_py
    assert "def _helper_attention(size, device):" in model_py
    assert "~_helper_attention(seq, x.device)" in model_py
    # `from . import attention` / `from . import layers`: their module prefix is flattened away
    assert "self.attn = CausalAttention(config)" in model_py
    assert "self.q_norm = RMSNorm(self.head_dim)" in model_py
    assert "attention.CausalAttention" not in model_py and "layers.RMSNorm" not in model_py
    assert "fgc_user" not in model_py
    # imports: torch and the standard library only
    assert _imported_modules(model_py) <= {"torch", "dataclasses", "functools", "math", "fgc_runtime"}
    assert black.format_str(model_py, mode=black.Mode()) == model_py
    # what the config builds
    assert "model_config = TinyLMConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2)" in model_py
    assert "block_factory = functools.partial(DecoderBlock)" in model_py

    # deterministic: a second build writes the same bytes
    again = run_fgc("build", "train.yaml", "-o", "build2", cwd=project)
    assert again.returncode == 0, again.stderr
    assert (project / "build2" / "model.py").read_bytes() == (project / "build" / "model.py").read_bytes()


def _project_classes(project, config: str) -> tuple:
    """The fixture project's config, model and block classes, imported as fgc imports them at build
    time for a spec written in PROJECT/CONFIG."""
    written_in, module_path = project / config, [project / MODELSRC]
    return tuple(
        resolve_spec(spec, written_in, [], module_path).obj
        for spec in (".config:TinyLMConfig", ".model:TinyCausalLM", ".layers:DecoderBlock")
    )


def test_the_vendored_model_computes_what_the_projects_modules_compute(tmp_path):
    project = _project(tmp_path)
    proc = run_fgc("build", "train.yaml", "-o", "build", cwd=project)
    assert proc.returncode == 0, proc.stderr
    # the project's own modules, imported as fgc imports them at build time
    config_cls, model_cls, block_cls = _project_classes(project, "train.yaml")
    torch.manual_seed(0)
    original = model_cls(config_cls(vocab_size=257, hidden_size=32, num_hidden_layers=2), block_cls)
    # the generated module, on its own
    spec = importlib.util.spec_from_file_location("generated_tiny_lm_model", project / "build" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up
    try:
        spec.loader.exec_module(module)
        generated = module.build_model()
    finally:
        del sys.modules[spec.name]
    assert sorted(generated.state_dict()) == sorted(original.state_dict())
    generated.load_state_dict(original.state_dict())
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(generated(ids), original(ids))


def test_the_package_trains_from_a_copy_away_from_the_project(tmp_path):
    project = _project(tmp_path)
    proc = run_fgc("build", "train.yaml", "-o", "build", cwd=project)
    assert proc.returncode == 0, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(project / "build", elsewhere / "pkg")
    shutil.rmtree(project)  # nothing of the project can be found any more
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "pkg/train.py", "--max-steps", "2"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (elsewhere / "output" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2
    assert all(math.isfinite(loss) and 4.0 < loss < 7.0 for loss in losses), losses  # ln 257 = 5.55


def test_a_relative_spec_that_does_not_resolve_is_one_error_at_its_line(tmp_path):
    project = _project(tmp_path)
    config = project / "train.yaml"
    config.write_text(config.read_text().replace(".layers:DecoderBlock", ".blocks:DecoderBlock"))
    proc = run_fgc("check", "train.yaml", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = line_of(config, ".blocks:DecoderBlock")
    assert lines[0].startswith(
        f"train.yaml:{line}: error: '.blocks:DecoderBlock': no module file blocks.py; looked in "
        f"{project} (beside train.yaml), {project / MODELSRC} (submodule_searchpath), "
    ), lines[0]
    assert "(template search path)" in lines[0]


def test_without_the_searchpath_the_project_modules_are_not_found(tmp_path):
    project = _project(tmp_path)
    config = project / "train.yaml"
    config.write_text(config.read_text().replace('    submodule_searchpath: [ "modelsrc/tiny_lm" ]\n', ""))
    proc = run_fgc("check", "train.yaml", cwd=project)
    assert proc.returncode == 2
    assert f"train.yaml:{line_of(config, '.config:TinyLMConfig')}: error: '.config:TinyLMConfig': no module file config.py; looked in {project} (beside train.yaml), " in proc.stderr


def test_a_submodule_searchpath_that_is_not_paths_is_an_error_at_its_line(tmp_path):
    project = _project(tmp_path)
    config = project / "train.yaml"
    config.write_text(config.read_text().replace('[ "modelsrc/tiny_lm" ]', "{ a: 1 }"))
    proc = run_fgc("check", "train.yaml", cwd=project)
    assert proc.returncode == 2
    assert (
        f"train.yaml:{line_of(config, 'submodule_searchpath: {')}: error: submodule_searchpath must be a "
        "directory path or a list of them"
    ) in proc.stderr


def test_a_project_module_used_as_a_value_is_refused_at_the_models_line(tmp_path):
    project = _project(tmp_path)
    attention = project / MODELSRC / "attention.py"
    attention.write_text(attention.read_text() + "\n\ndef norm_module():\n    return layers\n")
    config = project / "train.yaml"
    config.write_text(config.read_text() + "    norm_module: !singleton:.attention:norm_module\n")
    model = project / MODELSRC / "model.py"
    model.write_text(model.read_text().replace("block_factory):", "block_factory, norm_module=None):"))
    proc = run_fgc("check", "train.yaml", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"train.yaml:{line_of(config, 'TinyCausalLM@model')}: error: "
        f"{(MODELSRC / 'attention.py').as_posix()}: norm_module uses the module 'layers' itself; its "
        "definitions are copied into one file, so only layers.NAME can be vendored\n"
    )


def test_a_project_module_imported_by_its_absolute_name_asks_for_a_relative_import(tmp_path):
    project = _project(tmp_path)
    model = project / MODELSRC / "model.py"
    model.write_text(model.read_text().replace("from .config import", "from config import"))
    proc = run_fgc("check", "train.yaml", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert (
        "model.py imports 'config', another module of your project, by its absolute name: import it "
        "relatively (from .config import NAME), so that fgc copies what it uses"
    ) in proc.stderr


def test_the_searchpath_as_forgathers_templates_write_it_a_shared_top_level_list(tmp_path):
    # templatelib/base/models/causal_lm/custom.yaml: a top-level list, aliased into the node
    project = _project(tmp_path)
    config = project / "train.yaml"
    text = config.read_text()
    (project / "shared.yaml").write_text(
        text.replace(
            "[model]\n",
            "[model]\nmodel_submodule_searchpath: &model_submodule_searchpath\n    - \"modelsrc/tiny_lm\"\n",
        ).replace('submodule_searchpath: [ "modelsrc/tiny_lm" ]', "submodule_searchpath: *model_submodule_searchpath")
    )
    for name, out in (("train.yaml", "inline"), ("shared.yaml", "shared")):
        proc = run_fgc("build", name, "-o", out, cwd=project)
        assert proc.returncode == 0, proc.stderr
    inline = (project / "inline" / "model.py").read_text()
    shared = (project / "shared" / "model.py").read_text()
    # the same model; only the config's name and the target's line differ
    assert [line for line in inline.splitlines() if "train.yaml" not in line] == [
        line for line in shared.splitlines() if "shared.yaml" not in line
    ]


def test_two_modules_helpers_of_one_name_are_renamed_unless_the_config_names_both(tmp_path):
    (tmp_path / "a.py").write_text("def _helper():\n    return 1\n")
    (tmp_path / "b.py").write_text("def _helper():\n    return 2\n")
    (tmp_path / "c.py").write_text(
        "from .a import _helper as ha\nfrom .b import _helper as hb\n\n\ndef both():\n    return ha() + 10 * hb()\n"
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "x: !singleton:.c:both\n"
        "y: !singleton:builtins:tuple\n"
        "    - [ !partial:.a:_helper , !partial:.b:_helper ]\n"
    )
    proc = run_fgc("code", "cfg.yaml", "--target", "x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "def _helper_a():\n    return 1\n" in proc.stdout
    assert "def _helper_b():\n    return 2\n" in proc.stdout
    assert "return _helper_a() + 10 * _helper_b()" in proc.stdout
    namespace: dict = {}
    exec(compile(proc.stdout, "x.py", "exec"), namespace)
    assert namespace["construct"]() == 21
    # both named by the config: each must keep its name, which cannot be
    both = run_fgc("code", "cfg.yaml", "--target", "y", cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr == "cfg.yaml:2: error: a.py, b.py define the same name(s) ['_helper']: rename one\n"


def test_meta_generate_code_writes_the_projects_model_as_one_standalone_module(tmp_path):
    # Forgather's !meta:forgather.codegen:generate_code, carried out by fgc at build time: the
    # value is the source of a module that builds the model from the project's own modules
    project = _project(tmp_path)
    (project / "gen.yaml").write_text(
        ".model_config: &model_config !singleton:.config:TinyLMConfig@model_config\n"
        '    submodule_searchpath: [ "modelsrc/tiny_lm" ]\n'
        "    vocab_size: 64\n"
        ".define: &model_factory !singleton:.model:TinyCausalLM@model_factory\n"
        "    config: *model_config\n"
        "    block_factory: !partial:.layers:DecoderBlock@block_factory\n"
        "model_code_generator: !meta:forgather.codegen:generate_code@model_code_generator\n"
        "    obj: *model_factory\n"
    )
    proc = run_fgc("code", "gen.yaml", "--target", "model_code_generator", cwd=project)
    assert proc.returncode == 0, proc.stderr
    scope: dict = {}
    exec(compile(proc.stdout, "construct.py", "exec"), scope)
    source = scope["construct"]()
    assert _imported_modules(source) <= {"dataclasses", "functools", "math", "torch"}
    path = tmp_path / "generated_model_source.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generated_model_source", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up
    try:
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        generated = module.construct()
    finally:
        del sys.modules[spec.name]
    config_cls, model_cls, block_cls = _project_classes(project, "gen.yaml")
    torch.manual_seed(0)
    original = model_cls(config_cls(vocab_size=64), block_cls)
    assert sorted(generated.state_dict()) == sorted(original.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(generated(ids), original(ids))  # same seed, same init, same model
