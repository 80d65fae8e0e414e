"""Unit tests of fgc.frontend.render: inheritance, include, search path, globals, ``toyaml`` and
the mapping of every template error to the file and line the user wrote (docs/language.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fgc.errors import FgcError, display_path
from fgc.frontend.loader import load
from fgc.frontend.render import LIBRARY_DIR, render, toyaml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(config, *args, **kwargs) -> FgcError:
    with pytest.raises(FgcError) as info:
        render(config, *args, **kwargs)
    return info.value


def where(exc: FgcError, index: int = 0) -> tuple[str, int | None]:
    loc = exc.diagnostics[index].loc
    return loc.file, loc.line


def origin_of(rendered, line_text: str) -> tuple[str, int]:
    """The (file, line) the rendered line LINE_TEXT came from."""
    lines = rendered.text.split("\n")
    index = lines.index(line_text)
    loc = rendered.location(index)
    return loc.file, loc.line


# --- inheritance and include -------------------------------------------------------------------

BASE = """\
-- set ns = namespace()
[meta]
-- set ns.x = x | default(1)
[body]
a: {{ ns.x }}
b: 2
[tail]
t: 9
"""


def test_plain_config_renders(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\nb: {{ 1 + 1 }}\n")
    rendered = render(cfg)
    assert rendered.text == "a: 1\nb: 2\n"
    assert rendered.root.path == cfg.resolve()


def test_extends_with_super_and_replacement(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    cfg = write(
        tmp_path / "child.yaml",
        '-- extends "base.yaml"\n'
        "[meta]\n"
        "== super()\n"
        "-- set ns.x = 5\n"
        "[body]\n"
        "== super()\n"
        "c: 3\n"
        "[tail]\n"
        "t: 10\n",
    )
    rendered = render(cfg)
    assert rendered.text.split("\n") == ["", "a: 5", "b: 2", "", "c: 3", "t: 10", ""]
    base = str((tmp_path / "base.yaml").resolve())
    child = str(cfg.resolve())
    assert origin_of(rendered, "a: 5") == (base, 5)
    assert origin_of(rendered, "b: 2") == (base, 6)
    assert origin_of(rendered, "c: 3") == (child, 7)
    assert origin_of(rendered, "t: 10") == (child, 9)
    assert [f.path.name for f in rendered.files.values()] == ["child.yaml", "base.yaml"]


def test_child_text_outside_blocks_is_discarded(tmp_path):
    write(tmp_path / "base.yaml", "[body]\na: 1\n")
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\nstray: 1\n[body]\nb: 2\n')
    assert render(cfg).text == "b: 2\n"


def test_child_block_overrides_parent_block(tmp_path):
    write(tmp_path / "base.yaml", "top: 0\n[model]\nmodel: old\n[optimizer]\nopt: sgd\n")
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\n[model]\nmodel: new\n')
    rendered = render(cfg)
    assert rendered.text == "top: 0\nmodel: new\nopt: sgd\n"
    assert origin_of(rendered, "model: new") == (str(cfg.resolve()), 3)
    assert origin_of(rendered, "opt: sgd") == (str((tmp_path / "base.yaml").resolve()), 5)


def test_child_overrides_nested_block(tmp_path):
    write(tmp_path / "base.yaml", "[outer]\nm:\n  [inner]\n  a: 1\n  b: 2\n")
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\n[inner]\n  a: 10\n')
    assert render(cfg).text == "m:\n  a: 10\n"


def test_three_level_extends_with_super(tmp_path):
    write(tmp_path / "a.yaml", "[x]\none: 1\n")
    write(tmp_path / "b.yaml", '-- extends "a.yaml"\n[x]\n== super()\ntwo: 2\n')
    cfg = write(tmp_path / "c.yaml", '-- extends "b.yaml"\n[x]\n== super()\nthree: 3\n')
    rendered = render(cfg)
    # `== super()` prints the parent's block, its own newline included, then the line's newline
    assert rendered.text == "one: 1\n\ntwo: 2\n\nthree: 3\n"
    assert origin_of(rendered, "one: 1") == (str((tmp_path / "a.yaml").resolve()), 2)
    assert origin_of(rendered, "two: 2") == (str((tmp_path / "b.yaml").resolve()), 4)
    assert origin_of(rendered, "three: 3") == (str(cfg.resolve()), 4)


def test_rstrip_super_continues_a_mapping(tmp_path):
    write(tmp_path / "base.yaml", "m:\n[items]\n  a: 1\n\n\n")
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\n[items]\n=> super()\n  b: 2\n')
    assert render(cfg).text == "m:\n  a: 1\n  b: 2\n"


def test_include(tmp_path):
    write(tmp_path / "parts" / "opt.yaml", "lr: {{ lr }}\nmomentum: 0.9\n")
    cfg = write(tmp_path / "c.yaml", '-- set lr = 0.1\na: 1\n-- include "parts/opt.yaml"\nz: 2\n')
    rendered = render(cfg)
    assert rendered.text == "a: 1\nlr: 0.1\nmomentum: 0.9\nz: 2\n"
    inc = str((tmp_path / "parts" / "opt.yaml").resolve())
    assert origin_of(rendered, "lr: 0.1") == (inc, 1)
    assert origin_of(rendered, "momentum: 0.9") == (inc, 2)
    assert origin_of(rendered, "z: 2") == (str(cfg.resolve()), 4)
    loc = rendered.location(rendered.text.split("\n").index("momentum: 0.9"))
    assert loc.chain == ((str(cfg.resolve()), 3),)


def test_variables_are_jinja_variables(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\n')
    assert "a: 1\n" in render(cfg).text
    assert "a: 7\n" in render(cfg, variables={"x": 7}).text


# --- search path -------------------------------------------------------------------------------


def test_search_path_config_dir_wins_over_include_dirs(tmp_path):
    cfg = write(tmp_path / "cfg" / "c.yaml", '-- include "x.yaml"\n')
    write(tmp_path / "cfg" / "x.yaml", "v: cfg\n")
    write(tmp_path / "inc1" / "x.yaml", "v: inc1\n")
    assert render(cfg, [str(tmp_path / "inc1")]).text == "v: cfg\n"


def test_search_path_include_dirs_in_order(tmp_path):
    cfg = write(tmp_path / "cfg" / "c.yaml", '-- include "y.yaml"\n')
    write(tmp_path / "inc1" / "y.yaml", "v: inc1\n")
    write(tmp_path / "inc2" / "y.yaml", "v: inc2\n")
    assert render(cfg, [str(tmp_path / "inc1"), str(tmp_path / "inc2")]).text == "v: inc1\n"
    assert render(cfg, [str(tmp_path / "inc2"), str(tmp_path / "inc1")]).text == "v: inc2\n"


def test_search_path_include_dir_wins_over_library(tmp_path):
    cfg = write(tmp_path / "cfg" / "c.yaml", '-- include "lm/train.yaml"\n')
    write(tmp_path / "mine" / "lm" / "train.yaml", "v: mine\n")
    assert render(cfg, [str(tmp_path / "mine")]).text == "v: mine\n"
    write(tmp_path / "cfg" / "lm" / "train.yaml", "v: cfg\n")
    assert render(cfg, [str(tmp_path / "mine")]).text == "v: cfg\n"


def test_search_path_library_last(tmp_path):
    cfg = write(tmp_path / "c.yaml", '-- extends "lm/train.yaml"\n')
    rendered = render(cfg)
    paths = [f.path for f in rendered.files.values()]
    assert paths == [cfg.resolve(), LIBRARY_DIR / "lm" / "train.yaml"]
    assert rendered.files[1].display == "<fgc>/lm/train.yaml"
    assert "model: !singleton:fgc.components.causal_lm:CausalLM@model" in rendered.text


# --- globals and filters -----------------------------------------------------------------------


def test_path_globals(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "a: {{ joinpath('x', 'y.txt') }}\n"
        "b: {{ basename('/p/q.yaml') }}\n"
        "c: {{ dirname('/p/q.yaml') }}\n"
        "d: {{ splitext('q.yaml')[1] }}\n"
        "e: {{ normpath('a/./b/../c') }}\n",
    )
    assert render(cfg).text == "a: x/y.txt\nb: q.yaml\nc: /p\nd: .yaml\ne: a/c\n"


def test_environment_global_is_a_nonreproducible_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("FGC_TEST_VALUE", "hello")
    cfg = write(tmp_path / "c.yaml", "a: {{ getenv('FGC_TEST_VALUE') }}\n")
    rendered = render(cfg)
    assert rendered.text == "a: hello\n"
    assert rendered.nonreproducible == {"getenv(FGC_TEST_VALUE)": "hello"}
    assert [w.severity for w in rendered.warnings] == ["warning"]
    assert "not reproducible" in rendered.warnings[0].message


def test_namespace_default_idiom(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "-- set ns = namespace()\n-- set ns.lr = lr | default(1.0e-3)\nlr: {{ ns.lr | toyaml }}\n",
    )
    assert render(cfg).text == "lr: 0.001\n"
    assert render(cfg, variables={"lr": 0.5}).text == "lr: 0.5\n"


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "null"),
        (True, "True"),
        (False, "False"),
        (3, "3"),
        (1e-10, "1.0e-10"),
        (1e20, "1.0e+20"),
        (1.0e-3, "0.001"),
        (2.5, "2.5"),
        ("plain", "plain"),
        ("plain text", "plain text"),
        ("yes", "'yes'"),
        ("null", "'null'"),
        ("True", "'True'"),
        ("123", "'123'"),
        ("0x10", "'0x10'"),
        ("1e-4", "'1e-4'"),
        ("0o17", "'0o17'"),
        ("a: b", "'a: b'"),
        ("", "''"),
        ("#x", "'#x'"),
        ("it's", "it's"),
        ("a\nb", '"a\\nb"'),
        ("A\n", '"A\\n"'),  # a trailing newline is kept (a plain scalar would drop it)
        ("@x", "'@x'"),  # "@" is reserved: it cannot start a plain scalar
        ([1, "x", None], "[1, x, null]"),
        ((1, 2), "[1, 2]"),
        ({"a": 1, "b": "c d"}, "{a: 1, b: c d}"),
    ],
)
def test_toyaml_values(value, text):
    assert toyaml(value) == text


@pytest.mark.parametrize(
    "value", ["yes", "1e-4", "0x10", "0o17", "123", "null", "~", "True", "a: b", "a\nb", "", "x'y", "A\n", "@"]
)
def test_toyaml_strings_stay_strings_when_loaded(tmp_path, value):
    cfg = write(tmp_path / "c.yaml", "v: {{ value | toyaml }}\n")
    graph = load(render(cfg, variables={"value": value}))
    assert graph.node(graph.targets["v"]).value == value


def test_toyaml_in_template(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "a: {{ None | toyaml }}\n"
        "b: {{ True | toyaml }}\n"
        "c: {{ 1e-10 | toyaml }}\n"
        "d: {{ 'yes' | toyaml }}\n"
        "e: {{ undefined_name | toyaml(3) }}\n",
    )
    assert render(cfg).text == "a: null\nb: True\nc: 1.0e-10\nd: 'yes'\ne: 3\n"


def test_toyaml_undefined_without_default_is_an_error(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\nh: {{ undefined_v | toyaml }}\n")
    exc = error_of(cfg)
    assert where(exc) == (str(cfg.resolve()), 2)
    assert "undefined_v" in exc.diagnostics[0].message


# --- errors at the user's file and line ---------------------------------------------------------


def test_raise_reports_its_file_and_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", 'a: 1\n\n-- set _ = raise("boom here")\nb: 2\n')
    exc = error_of(cfg)
    assert len(exc.diagnostics) == 1
    assert exc.diagnostics[0].message == "boom here"
    assert where(exc) == (str(cfg.resolve()), 3)


def test_raise_in_parent_reports_parent_line(tmp_path):
    parent = write(tmp_path / "p.yaml", "a: 1\n[blk]\n-- set _ = raise('from parent')\n")
    cfg = write(tmp_path / "c.yaml", '## child\n-- extends "p.yaml"\n')
    exc = error_of(cfg)
    assert exc.diagnostics[0].message == "from parent"
    assert where(exc) == (str(parent.resolve()), 3)
    assert exc.diagnostics[0].loc.chain == ((str(cfg.resolve()), 2),)


def test_raise_in_block_of_library_template(tmp_path):
    cfg = write(tmp_path / "c.yaml", '-- extends "lm/train.yaml"\n')
    exc = error_of(cfg, variables={"trainer_type": "nope"})
    lib = (LIBRARY_DIR / "lm" / "train.yaml").read_text().split("\n")
    line = next(i for i, t in enumerate(lib, 1) if "raise(\"trainer_type" in t)
    assert where(exc) == (str(LIBRARY_DIR / "lm" / "train.yaml"), line)
    assert exc.diagnostics[0].message == "trainer_type nope is not one of basic, ddp, fsdp2, pipeline, diloco"


def test_assert_global(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n-- set _ = assert(x > 1, 'x too small')\n")
    assert render(cfg, variables={"x": 2}).text == "a: 1\n"
    exc = error_of(cfg, variables={"x": 1})
    assert exc.diagnostics[0].message == "x too small"
    assert where(exc) == (str(cfg.resolve()), 2)


def test_undefined_variable_names_it_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n\nb: {{ nope }}\n")
    exc = error_of(cfg)
    assert "'nope' is undefined" in exc.diagnostics[0].message
    assert where(exc) == (str(cfg.resolve()), 3)


def test_undefined_variable_in_parent_reports_parent_line(tmp_path):
    parent = write(tmp_path / "parent.yaml", "q: 1\nw: {{ missing_thing }}\n[x]\nz: 1\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "parent.yaml"\n[x]\ny: 1\n')
    exc = error_of(cfg)
    assert "'missing_thing' is undefined" in exc.diagnostics[0].message
    assert where(exc) == (str(parent.resolve()), 2)
    assert exc.diagnostics[0].loc.chain == ((str(cfg.resolve()), 1),)


def test_undefined_variable_in_parent_block_reports_parent_line(tmp_path):
    parent = write(tmp_path / "parent.yaml", "[x]\nz: 1\n[y]\n\nw: {{ ns_missing }}\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "parent.yaml"\n[x]\nz: 2\n')
    exc = error_of(cfg)
    assert "'ns_missing' is undefined" in exc.diagnostics[0].message
    assert where(exc) == (str(parent.resolve()), 5)


def test_undefined_variable_in_included_file(tmp_path):
    inc = write(tmp_path / "inc.yaml", "k: 1\nm: {{ other_missing }}\n")
    cfg = write(tmp_path / "c.yaml", 'a: 1\n-- include "inc.yaml"\n')
    exc = error_of(cfg)
    assert "'other_missing' is undefined" in exc.diagnostics[0].message
    assert where(exc) == (str(inc.resolve()), 2)
    assert exc.diagnostics[0].loc.chain == ((str(cfg.resolve()), 2),)


def test_undefined_attribute(tmp_path):
    cfg = write(tmp_path / "c.yaml", "-- set ns = namespace()\na: 1\nb: {{ ns.nope }}\n")
    exc = error_of(cfg)
    assert "nope" in exc.diagnostics[0].message
    assert where(exc) == (str(cfg.resolve()), 3)


def test_expression_type_error_is_a_user_error_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\nb: {{ 'x' // 2 }}\n")
    exc = error_of(cfg)
    assert where(exc) == (str(cfg.resolve()), 2)
    assert "TypeError" in exc.diagnostics[0].message


def test_expression_error_in_library_template_from_a_define(tmp_path):
    cfg = write(tmp_path / "c.yaml", '-- extends "lm/train.yaml"\n')
    exc = error_of(cfg, variables={"max_steps": "abc"})
    file, line = where(exc)
    assert file == str(LIBRARY_DIR / "lm" / "train.yaml")
    lib = (LIBRARY_DIR / "lm" / "train.yaml").read_text().split("\n")
    assert "ns.max_steps // 10" in lib[line - 1]


def test_sandbox_refuses_unsafe_attribute(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\nb: {{ ''.__class__ }}\n")
    exc = error_of(cfg)
    assert where(exc) == (str(cfg.resolve()), 2)
    assert "unsafe" in exc.diagnostics[0].message


def test_syntax_error_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n## c\nb: {{ 1 + }}\n")
    exc = error_of(cfg)
    assert exc.diagnostics[0].message.startswith("template syntax:")
    assert where(exc) == (str(cfg.resolve()), 3)


def test_syntax_error_of_a_line_statement(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n-- if\nb: 2\n-- endif\n")
    exc = error_of(cfg)
    assert where(exc) == (str(cfg.resolve()), 2)


def test_syntax_error_in_parent(tmp_path):
    parent = write(tmp_path / "p.yaml", "a: 1\nb: 2\n-- endif\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n')
    exc = error_of(cfg)
    assert where(exc) == (str(parent.resolve()), 3)


def test_unknown_filter_is_a_syntax_error_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\nb: {{ 1 | nosuchfilter }}\n")
    exc = error_of(cfg)
    assert "nosuchfilter" in exc.diagnostics[0].message
    assert where(exc) == (str(cfg.resolve()), 2)


def test_extends_not_found_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", '## c\n\n-- extends "nothere.yaml"\n')
    exc = error_of(cfg, [str(tmp_path / "inc")])
    assert exc.diagnostics[0].message == "template not found: 'nothere.yaml'"
    assert where(exc) == (str(cfg.resolve()), 3)
    hint = exc.diagnostics[0].hint
    assert hint == "searched: " + ", ".join(
        [str(tmp_path.resolve()), str((tmp_path / "inc").resolve()), str(LIBRARY_DIR)]
    )


def test_include_not_found_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", 'a: 1\n-- include "nothere.yaml"\n')
    exc = error_of(cfg)
    assert exc.diagnostics[0].message == "template not found: 'nothere.yaml'"
    assert where(exc) == (str(cfg.resolve()), 2)


def test_include_not_found_in_parent(tmp_path):
    parent = write(tmp_path / "p.yaml", 'a: 1\n[b]\n-- include "gone.yaml"\n')
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n')
    exc = error_of(cfg)
    assert where(exc) == (str(parent.resolve()), 3)


def test_missing_config(tmp_path):
    exc = error_of(tmp_path / "missing.yaml")
    assert exc.diagnostics[0].message == "no such config file"
    assert where(exc) == (str(tmp_path / "missing.yaml"), None)


def test_config_is_a_directory(tmp_path):
    exc = error_of(tmp_path)
    assert exc.diagnostics[0].message == "the config is a directory"


def test_non_utf8_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b'ok: 1\na: "\xff\xfe"\n')
    exc = error_of(cfg)
    assert exc.diagnostics[0].message == "file is not valid UTF-8 (byte 10)"
    assert where(exc) == (str(cfg.resolve()), 2)


def test_non_utf8_included_file(tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"x: \xe9\n")
    cfg = write(tmp_path / "c.yaml", 'a: 1\n-- include "bad.yaml"\n')
    exc = error_of(cfg)
    assert "not valid UTF-8" in exc.diagnostics[0].message
    assert exc.diagnostics[0].loc.file == str((tmp_path / "bad.yaml").resolve())


def test_extends_cycle_is_an_error_showing_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", '## a\n-- extends "b.yaml"\n')
    write(tmp_path / "b.yaml", '-- extends "a.yaml"\n')
    exc = error_of(a)
    message = exc.diagnostics[0].message
    assert message.startswith("extends/include cycle: ")
    assert "a.yaml:2 extends 'b.yaml'" in message
    assert "b.yaml:1 extends 'a.yaml'" in message
    assert where(exc) == (str(a.resolve()), 2)


def test_self_extends_is_an_error(tmp_path):
    cfg = write(tmp_path / "self.yaml", '-- extends "self.yaml"\n')
    exc = error_of(cfg)
    assert exc.diagnostics[0].message.startswith("extends/include cycle: ")
    assert where(exc) == (str(cfg.resolve()), 1)


def test_include_cycle_is_an_error(tmp_path):
    cfg = write(tmp_path / "c.yaml", 'a: 1\n-- include "x.yaml"\n')
    x = write(tmp_path / "x.yaml", 'b: 2\n-- include "y.yaml"\n')
    write(tmp_path / "y.yaml", 'c: 3\n-- include "x.yaml"\n')
    exc = error_of(cfg)
    assert exc.diagnostics[0].message.startswith("extends/include cycle: ")
    assert where(exc) == (str(x.resolve()), 2)


def test_error_format_has_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "c.yaml", "a: 1\nb: {{ nope }}\n")
    exc = error_of("c.yaml")
    assert str(exc).split("\n")[0] == "c.yaml:2: error: undefined: 'nope' is undefined"


def test_error_format_shows_one_line_per_template_in_the_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "x: 1\n[blk]\n-- set _ = raise('deep')\n")
    write(tmp_path / "b.yaml", '## b\n-- extends "a.yaml"\n')
    write(tmp_path / "c.yaml", '-- extends "b.yaml"\n')
    exc = error_of("c.yaml")
    assert exc.diagnostics[0].loc.chain == (
        (str((tmp_path / "b.yaml").resolve()), 2),
        (str((tmp_path / "c.yaml").resolve()), 1),
    )
    assert str(exc).split("\n") == [
        "a.yaml:3: error: deep",
        "  in a.yaml:3, included or extended from b.yaml:2",
        "  in b.yaml:2, included or extended from c.yaml:1",
    ]


def test_unclosed_statement_names_where_it_opened(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n-- if true\nb: 2\n-- for x in [1]\n-- endfor\n")
    exc = error_of(cfg)
    d = exc.diagnostics[0]
    assert "Unexpected end of template" in d.message
    assert d.hint == f"the 'if' opened at {display_path(str(cfg.resolve()))}:2 is never closed"


def test_unknown_statement_at_its_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: 1\n-- frob x\nb: 2\n")
    exc = error_of(cfg)
    assert exc.diagnostics[0].message == "template syntax: Encountered unknown tag 'frob'."
    assert where(exc) == (str(cfg.resolve()), 2)


def test_block_warnings_follow_a_computed_parent(tmp_path):
    # mid.yaml's parent is computed ("base_" ~ kind ~ ".yaml"): a child of mid.yaml that overrides
    # a block of base_a.yaml is not warned about; a misspelt block still is
    write(tmp_path / "base_a.yaml", "[head]\nh: 1\n[body]\nb: 1\n")
    write(tmp_path / "mid.yaml", '-- set kind = "a"\n-- extends "base_" ~ kind ~ ".yaml"\n[head]\nh: 2\n')
    child = write(tmp_path / "child.yaml", '-- extends "mid.yaml"\n[body]\nb: 3\n[bodyy]\nz: 1\n')
    rendered = render(child)
    assert [(w.loc.line, w.message) for w in rendered.warnings] == [
        (4, "block 'bodyy' is not defined by the template this one extends; its content is ignored")
    ]
    ir = load(rendered)
    assert {k: ir.node(v).value for k, v in ir.targets.items()} == {"h": 2, "b": 3}


def test_tree_follows_a_computed_parent_and_names_files_as_errors_do():
    from conftest import EXAMPLE, REPO, run_fgc

    LLAMA = REPO / "fgc" / "families" / "llama" / "template.yaml"

    lines = run_fgc("tree", EXAMPLE, check=True).stdout.splitlines()
    assert lines == [
        "examples/tiny_llama/train.yaml",
        f"    extends 'lm/llama.yaml' (line {_line(EXAMPLE, '-- extends')}): fgc/families/llama/template.yaml",
        f"        extends 'lm/train.yaml' (line {_line(LLAMA, '-- extends')}): fgc/templates/lm/train.yaml",
    ]


def _line(path: Path, start: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(start))
