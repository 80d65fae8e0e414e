"""`fgc code` and `fgc graph`: the printed module builds what the config means."""

from __future__ import annotations

import functools
import json
import sys
import textwrap

import pytest

from conftest import EXAMPLE, run_fgc

HELPERS = '''
class Box:
    def __init__(self, *items, **named):
        self.items = items
        self.named = named
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "code_helpers.py").write_text(HELPERS)
    return tmp_path


def construct_from(project, text, target, **variables):
    cfg = project / "cfg.yaml"
    cfg.write_text(textwrap.dedent(text))
    proc = run_fgc("code", cfg, "--target", target, cwd=project, env={"PYTHONPATH": str(project)})
    assert proc.returncode == 0, proc.stderr
    namespace: dict = {}
    sys.path.insert(0, str(project))
    try:
        exec(compile(proc.stdout, "<fgc code>", "exec"), namespace)
        return namespace["construct"](**variables), proc.stdout
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("code_helpers", None)


def test_code_round_trip_sharing_fresh_and_partials(project):
    box, source = construct_from(
        project,
        """
        .shared: &shared !singleton:code_helpers:Box [1]
        .fresh: &fresh !factory:code_helpers:Box [2]
        .later: &later !partial:code_helpers:Box
            tag: late
        top: !singleton:code_helpers:Box
            - *shared
            - *shared
            - *fresh
            - *fresh
            - *later
            - !var {name: size, default: 3}
            - !var scale
        """,
        "top",
        scale=0.5,
    )
    a, b, c, d, p, size, scale = box.items
    assert a is b and a.items == (1,)
    assert c is not d and c.items == d.items == (2,)
    assert isinstance(p, functools.partial) and p().named == {"tag": "late"}
    assert (size, scale) == (3, 0.5)
    assert "def construct(*, scale, size=3):" in source


def test_code_requires_unbound_variables(project):
    with pytest.raises(TypeError, match="scale"):
        construct_from(project, "top: !singleton:code_helpers:Box [!var scale]\n", "top")


def test_code_of_the_example_model_builds_it(tmp_path):
    proc = run_fgc("code", EXAMPLE, "--target", "model")
    assert proc.returncode == 0, proc.stderr
    assert "import fgc" not in proc.stdout and "from fgc." not in proc.stdout
    namespace: dict = {}
    exec(compile(proc.stdout, "<fgc code>", "exec"), namespace)
    model = namespace["construct"]()
    assert type(model).__name__ == "CausalLM"
    assert model.lm_head.weight.shape == (257, 96)


def test_code_unknown_target(tmp_path):
    proc = run_fgc("code", EXAMPLE, "--target", "nope")
    assert proc.returncode == 2
    assert "error: no target 'nope'" in proc.stderr


def test_graph_formats(tmp_path):
    data = json.loads(run_fgc("graph", EXAMPLE, "--target", "optimizer", "--format", "json", check=True).stdout)
    assert data["targets"] == {"optimizer": "optimizer"}
    assert data["nodes"]["optimizer"]["spec"] == "torch.optim:AdamW"
    assert data["nodes"]["optimizer.lr"]["value"] == 0.003
    assert set(data["nodes"]) == {
        "optimizer", "optimizer.lr", "optimizer.betas", "optimizer.betas.0", "optimizer.betas.1",
        "optimizer.weight_decay",
    }
    dot = run_fgc("graph", EXAMPLE, "--target", "optimizer", "--format", "dot", check=True).stdout
    assert dot.startswith("digraph fgc {") and '"optimizer" -> "optimizer.lr" [label="kw:lr"];' in dot
    py = run_fgc("graph", EXAMPLE, "--target", "optimizer", "--target", "lr_scheduler", "--format", "python", check=True).stdout
    namespace: dict = {}
    exec(compile(py, "<graph>", "exec"), namespace)
    built = namespace["construct"]()
    assert set(built) == {"optimizer", "lr_scheduler"}
    assert built["optimizer"].keywords["lr"] == 0.003
