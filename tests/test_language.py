"""The config language beyond the basics: inline templates, projects, blocks, !dlist, tree, ls."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import run_fgc
from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import render


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def values(ir, node_id):
    node = ir.node(node_id)
    return [ir.node(c).value for c in node.args]


# ---- inline templates ------------------------------------------------------------------------


def test_inline_templates_extend_and_include(tmp_path):
    cfg = write(
        tmp_path / "cfg.yaml",
        """
        -- extends "base.inline"
        [body]
        == super()
        child: 2
        #--- base.inline ---
        [body]
        parent: 1
        -- include "part"
        #--- part ---
        included: 3
        """,
    )
    rendered = render(cfg)
    ir = load(rendered)
    assert {k: ir.node(v).value for k, v in ir.targets.items()} == {"parent": 1, "included": 3, "child": 2}
    # every line is reported as a line of the file that holds it
    assert ir.node("parent").loc.line == 7
    assert ir.node("included").loc.line == 10
    assert ir.node("child").loc.line == 4


def test_inline_template_error_points_into_its_file(tmp_path):
    cfg = write(
        tmp_path / "cfg.yaml",
        """
        -- extends "base"
        #--- base ---
        ok: 1
        bad: {{ nope }}
        """,
    )
    with pytest.raises(FgcError) as info:
        render(cfg)
    d = info.value.diagnostics[0]
    assert (d.loc.file, d.loc.line) == (str(cfg), 4)
    assert "'nope' is undefined" in d.message


def test_duplicate_inline_names_in_two_files(tmp_path):
    write(tmp_path / "other.yaml", "x: 1\n#--- shared ---\ny: 2\n")
    cfg = write(tmp_path / "cfg.yaml", '-- include "other.yaml"\n#--- shared ---\nz: 3\n')
    with pytest.raises(FgcError) as info:
        render(cfg)
    d = info.value.diagnostics[0]
    assert "inline template 'shared' is defined twice" in d.message
    assert str(tmp_path / "cfg.yaml") in d.message or str(tmp_path / "other.yaml") in d.message
    assert d.loc.line == 2


# ---- blocks ------------------------------------------------------------------------------------


def test_child_block_missing_in_parent_is_a_warning(tmp_path):
    write(tmp_path / "base.yaml", "[model]\nmodel: 1\n")
    cfg = write(tmp_path / "cfg.yaml", '-- extends "base.yaml"\n[modle]\nmodel: 2\n')
    rendered = render(cfg)
    [w] = rendered.warnings
    assert w.severity == "warning" and "block 'modle'" in w.message
    assert (w.loc.file, w.loc.line) == (str(cfg), 2)
    proc = run_fgc("pp", cfg)
    assert proc.returncode == 0
    assert f"{cfg}:2: warning: block 'modle'" in proc.stderr or "cfg.yaml:2: warning: block 'modle'" in proc.stderr


def test_explicit_block_closes_headers_inside_it(tmp_path):
    write(tmp_path / "base.yaml", "-- block all\n[a]\na: 1\n[b]\nb: 2\n-- endblock\nc: 3\n")
    cfg = write(tmp_path / "cfg.yaml", '-- extends "base.yaml"\n[b]\nb: 20\n')
    ir = load(render(cfg))
    assert {k: ir.node(v).value for k, v in ir.targets.items()} == {"a": 1, "b": 20, "c": 3}


# ---- !dlist ------------------------------------------------------------------------------------


def test_dlist_override_delete_and_empty(tmp_path):
    write(tmp_path / "base.yaml", "[empty]\nempty: !dlist\n    null: ~\n[layers]\nlayers: !dlist\n    a: 1\n    b: 2\n    c: 3\n")
    cfg = write(tmp_path / "cfg.yaml", '-- extends "base.yaml"\n[layers]\n== super()\n    b: 20\n    a: ~\n    d: 4\n')
    ir = load(render(cfg))
    assert values(ir, "layers") == [20, 3, 4]
    assert values(ir, "empty") == []
    history = ir.node("layers").key_history["b"]
    assert [(Path(h.file).name, h.line) for h in history] == [("base.yaml", 7), ("cfg.yaml", 4)]


def test_dlist_same_file_duplicate_is_an_error(tmp_path):
    cfg = write(tmp_path / "cfg.yaml", "x: !dlist\n    a: 1\n    a: 2\n")
    with pytest.raises(FgcError) as info:
        load(render(cfg))
    assert info.value.diagnostics[0].loc.line == 3


# ---- projects and workspaces ----------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    write(
        ws / "forgather_workspace" / "meta_defaults.yaml",
        """
        [paths]
        searchdir:
            - "{{ joinpath(project_dir, 'templates') }}"
            - "{{ joinpath(workspace_root, 'forgather_workspace') }}"
        [configs]
        config_prefix: configs
        """,
    )
    write(ws / "forgather_workspace" / "common.yaml", "shared_value: {{ size * 2 }}\n")
    proj = ws / "proj"
    write(
        proj / "meta.yaml",
        """
        -- extends "meta_defaults.yaml"
        [configs]
        name: Demo
        config_prefix: experiments
        default_config: small.yaml
        """,
    )
    write(
        proj / "templates" / "base.yaml",
        """
        -- set size = size | default(4)
        where: {{ basename(project_dir) }}
        -- include "common.yaml"
        [extra]
        """,
    )
    write(proj / "experiments" / "small.yaml", '-- extends "base.yaml"\n')
    write(proj / "experiments" / "big.yaml", '-- extends "base.yaml"\n[extra]\nbig: true\n')
    write(proj / "experiments" / "broken.yaml", '-- extends "missing.yaml"\n')
    return proj


def test_project_search_path_and_globals(workspace):
    ir = load(render(workspace / "experiments" / "big.yaml"))
    assert {k: ir.node(v).value for k, v in ir.targets.items()} == {"where": "proj", "shared_value": 8, "big": True}


def test_dash_p_names_a_config_or_takes_the_default(workspace):
    default = run_fgc("pp", "-p", workspace)
    assert default.returncode == 0, default.stderr
    assert "where: proj" in default.stdout and "big" not in default.stdout
    named = run_fgc("pp", "-p", workspace, "big.yaml", "-D", "size=5")
    assert named.returncode == 0, named.stderr
    assert "shared_value: 10" in named.stdout and "big: true" in named.stdout
    missing = run_fgc("pp", "-p", workspace, "nope.yaml")
    assert missing.returncode == 2
    assert "no config 'nope.yaml' in project" in missing.stderr
    assert "big.yaml" in missing.stderr  # the hint lists the configs


def test_ls_lists_project_configs(workspace):
    proc = run_fgc("ls", workspace)
    assert proc.returncode == 2  # one config is broken
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("big.yaml: OK")
    assert "broken.yaml:" in lines[1] and "broken.yaml:1: error: template not found: 'missing.yaml'" in lines[1]
    assert lines[2].endswith("small.yaml: OK")
    ok = run_fgc("ls", workspace / "templates")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_tree_text_and_dot(workspace):
    text = run_fgc("tree", workspace / "experiments" / "small.yaml", check=True).stdout.splitlines()
    assert text[0].endswith("experiments/small.yaml")
    assert text[1].startswith("    extends 'base.yaml' (line 1): ") and text[1].endswith("templates/base.yaml")
    assert text[2].startswith("        include 'common.yaml' (line 3): ")
    assert text[2].endswith("forgather_workspace/common.yaml")
    dot = run_fgc("tree", workspace / "experiments" / "small.yaml", "--format", "dot", check=True).stdout
    assert dot.startswith("digraph templates {")
    assert '[label="extends (line 1)"];' in dot and '[label="include (line 3)"];' in dot


# ---- reproducibility -------------------------------------------------------------------------------


def test_time_and_environment_globals_warn(tmp_path):
    cfg = write(tmp_path / "cfg.yaml", "when: '{{ utcisotime() }}'\nhome: '{{ getenv(\"HOME\") }}'\nhost: '{{ hostname }}'\n")
    rendered = render(cfg)
    messages = [w.message for w in rendered.warnings]
    assert any("utcisotime()" in m for m in messages)
    assert any("getenv(HOME)" in m for m in messages)
    assert any("hostname" in m for m in messages)
    assert set(rendered.nonreproducible) == {"utcisotime()", "getenv(HOME)", "hostname"}


def test_versions_global(tmp_path):
    cfg = write(tmp_path / "cfg.yaml", "py: '{{ versions.python }}'\ntorch: '{{ versions.torch }}'\n")
    ir = load(render(cfg))
    import sys

    import torch

    assert ir.node("py").value == sys.version.split()[0]
    assert ir.node("torch").value.split("+")[0] == torch.__version__.split("+")[0]
