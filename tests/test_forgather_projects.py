"""Forgather's project layout and the idioms of its templates (issue #17, items 1 and 2).

The fixture ``tests/fixtures/forgather/ws`` is a workspace in Forgather's layout written for these
tests: ``forgather_workspace/meta_defaults.yaml`` with searchdir blocks, a template library, and a
project whose configs are ``templates/experiments/*`` (``<searchdir>/<config_prefix>/<name>``).
Forgather's own renderer gives the same YAML for its three configs
(``scripts/forgather_diff.py`` with a Forgather checkout).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_fgc
from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import render

FIXTURE = REPO / "tests" / "fixtures" / "forgather" / "ws"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


class _AnyTag(yaml.SafeLoader):
    """Reads YAML whatever its tags (a tagged node as its plain value)."""


def _plain(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_AnyTag.add_multi_constructor("!", _plain)


def data(text: str):
    return yaml.load(text, Loader=_AnyTag)


@pytest.fixture
def ws(tmp_path):
    """A copy of the fixture workspace (tests may add files to it)."""
    shutil.copytree(FIXTURE, tmp_path / "ws")
    return tmp_path / "ws"


def test_ls_p_lists_the_configs_found_through_searchdir_and_config_prefix(ws):
    proc = run_fgc("ls", "-p", ws / "proj")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.rsplit("/", 1)[-1] for line in lines] == ["big.yaml: OK", "small.yaml: OK", "nested.yaml: OK"]
    assert all("/templates/experiments/" in line for line in lines)
    # the same listing from inside the project, and from the folder above it
    inside = run_fgc("ls", cwd=ws / "proj").stdout.splitlines()
    assert [line.split("experiments/")[-1] for line in inside] == [line.split("experiments/")[-1] for line in lines]
    above = run_fgc("ls", ws)
    assert above.returncode == 0, above.stdout
    # a workspace's configs are its projects': its templates and library are not configs
    assert len(above.stdout.splitlines()) == 3


def test_pp_p_renders_the_default_config_and_a_named_one(ws):
    default = run_fgc("pp", "-p", ws / "proj")
    assert default.returncode == 0, default.stderr
    loaded = data(default.stdout)
    assert loaded["model"] == {"width": 4} and loaded["extras"] == {"base": 1}
    # the header: trim() drops the blank lines before it; comments built from data stay comments
    lines = default.stdout.splitlines()
    assert lines[0] == "#" + "-" * 39 and " ".join(lines[1].split()) == "# Demo project"
    assert "# Module: tiny" in lines
    assert any(line.startswith("#     python: 3.") for line in lines)
    assert f"!singleton:{ws.resolve()}/proj/model_src/tiny.py:make_layer" in default.stdout
    big = run_fgc("pp", "-p", ws / "proj", "big.yaml")
    assert big.returncode == 0, big.stderr
    # an indented `== super()` keeps the parent's indentation; `##no-blank` is a comment; the last
    # line of big.yaml has no newline and still ends its block
    assert data(big.stdout)["extras"] == {"base": 1, "big": True}
    assert "no blank" not in big.stdout
    nested = run_fgc("pp", "-p", ws / "proj", "sub/nested.yaml", check=True)
    assert " Nested " in nested.stdout.splitlines()[1]


def test_targets_and_code_resolve_a_model_named_by_its_path_in_the_project(ws):
    targets = run_fgc("targets", "-p", ws / "proj", "big.yaml", check=True).stdout.splitlines()
    assert [t.split("\t")[0] for t in targets] == ["model", "extras"]
    code = run_fgc("code", "-p", ws / "proj", "big.yaml", "--target", "model", check=True).stdout
    assert "model = make_layer(width=8)" in code


def test_a_define_cannot_reach_a_tag_through_a_path(ws):
    write(
        ws / "proj" / "templates" / "experiments" / "named.yaml",
        """
        model: !singleton:{{ joinpath(project_dir, 'model_src', name) }}:make_layer
            width: 2
        """,
    )
    proc = run_fgc("pp", "-p", ws / "proj", "named.yaml", "-D", "name=tiny.py")
    assert proc.returncode == 2
    assert "named.yaml:1: error: data cannot be part of a YAML tag" in proc.stderr
    write(
        ws / "proj" / "templates" / "experiments" / "fixed.yaml",
        "model: !singleton:{{ joinpath(project_dir, 'model_src', 'tiny.py') }}:make_layer\n",
    )
    assert run_fgc("pp", "-p", ws / "proj", "fixed.yaml").returncode == 0
    moved = run_fgc("pp", "-p", ws / "proj", "fixed.yaml", "-D", "project_dir=/etc")
    assert moved.returncode == 2  # a -D named project_dir is data like any -D
    assert "data cannot be part of a YAML tag" in moved.stderr


def test_a_project_without_default_config_takes_its_first_config(ws):
    meta = ws / "proj" / "meta.yaml"
    meta.write_text(meta.read_text().replace('default_config: "small.yaml"\n', ""))
    proc = run_fgc("pp", "-p", ws / "proj", check=True)
    assert data(proc.stdout)["extras"] == {"base": 1, "big": True}  # big.yaml sorts first


def test_an_unknown_config_lists_the_configs_and_where_it_looked(ws):
    proc = run_fgc("pp", "-p", ws / "proj", "nope.yaml")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.endswith("meta.yaml: error: no config 'nope.yaml' in project " + str((ws / "proj").resolve()))
    assert "configs: big.yaml, small.yaml, sub/nested.yaml; searched: " in proc.stderr
    assert "templates/experiments" in proc.stderr


def test_fgc_layout_projects_still_find_configs_in_the_project(tmp_path):
    write(tmp_path / "p" / "meta.yaml", "default_config: a.yaml\n")
    write(tmp_path / "p" / "configs" / "a.yaml", "x: 1\n")
    assert run_fgc("pp", "-p", tmp_path / "p", check=True).stdout == "x: 1\n"


def test_meta_templates_come_from_the_users_forgather_config_dir(tmp_path):
    home = tmp_path / "xdg"
    write(home / "forgather" / "templates" / "user_defaults.yaml", "config_prefix: mine\n")
    write(tmp_path / "p" / "meta.yaml", '-- include "user_defaults.yaml"\n')
    write(tmp_path / "p" / "templates" / "mine" / "c.yaml", "where: {{ forgather_config_dir() }}\n")
    proc = run_fgc("pp", "-p", tmp_path / "p", "c.yaml", env={"XDG_CONFIG_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert data(proc.stdout) == {"where": str(home / "forgather")}
    assert "not reproducible: the config uses forgather_config_dir()" in proc.stderr


def test_forgathers_globals(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = write(
        tmp_path / "g.yaml",
        """
        mod: {{ modname_from_path('/a/b/layers.py') }}
        cache: {{ user_cache_dir('demo') }}
        ext: {{ splitext('x/y.tar')[1] }}
        """,
    )
    rendered = render(cfg)
    assert data(rendered.text) == {"mod": "layers", "cache": str(tmp_path / "cache" / "demo"), "ext": ".tar"}
    assert any("user_cache_dir()" in w.message for w in rendered.warnings)


def test_an_undefined_path_part_is_an_undefined_error(tmp_path):
    cfg = write(tmp_path / "u.yaml", "a: 1\nb: {{ joinpath('x', missing) }}\n")
    with pytest.raises(FgcError) as info:
        render(cfg)
    d = info.value.diagnostics[0]
    assert (d.loc.line, d.message) == (2, "undefined: 'missing' is undefined")


def test_a_comment_built_from_data_stays_a_comment_and_a_value_stays_a_value(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        """
        -- for key, value in {"k": host}.items()
        == '# ' + key + ': ' + value
        -- endfor
        v: {{ "# " ~ host }}
        w: {{ 'x' ~ host }}
        """,
    )
    text = render(cfg, variables={"host": "h: 1"}).text
    assert text.splitlines()[0] == "# k: 'h: 1'"
    ir = load(render(cfg, variables={"host": "h: 1"}))
    # data joined to template text that does not start a comment is still one value
    assert ir.node(ir.targets["w"]).value == "xh: 1"
    assert "v" in ir.targets


def test_the_differential_script_renders_the_fixture_without_forgather(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "forgather_diff.py"), str(tmp_path), "--under", str(FIXTURE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "does not import" in proc.stderr  # no Forgather checkout at tmp_path: fgc only
    assert proc.stdout.splitlines()[-1].split() == ["1", "3", "-", "3", "-", "3"]
