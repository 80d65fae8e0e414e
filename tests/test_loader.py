"""Unit tests of fgc.frontend.loader: YAML tags and argument forms → IR, sharing, names, YAML 1.2
scalars, duplicate keys and the file:line of every node (docs/language.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import render
from fgc.ir import IRGraph


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def graph_of(tmp_path: Path, text: str, name: str = "c.yaml") -> IRGraph:
    return load(render(write(tmp_path / name, text)))


def load_error(tmp_path: Path, text: str) -> FgcError:
    with pytest.raises(FgcError) as info:
        graph_of(tmp_path, text)
    return info.value


def target(graph: IRGraph, name: str):
    return graph.node(graph.targets[name])


def values(graph: IRGraph, ids: list[str]) -> list:
    return [graph.node(i).value for i in ids]


def kwvalues(graph: IRGraph, node) -> dict:
    return {k: graph.node(v).value for k, v in node.kwargs.items()}


# --- call tags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag, mode",
    [
        ("singleton", "singleton"),
        ("call", "singleton"),
        ("factory", "factory"),
        ("partial", "partial"),
        ("lambda", "partial"),
    ],
)
def test_call_tags_and_modes(tmp_path, tag, mode):
    graph = graph_of(tmp_path, f"a: !{tag}:torch.nn:Linear [2, 3]\n")
    node = target(graph, "a")
    assert (node.kind, node.mode, node.spec, node.name) == ("call", mode, "torch.nn:Linear", None)
    assert node.id == "a"
    assert node.args == ["a.arg0", "a.arg1"]
    assert values(graph, node.args) == [2, 3]
    assert node.kwargs == {}


def test_call_spec_forms_kept_as_written(tmp_path):
    graph = graph_of(
        tmp_path,
        "a: !singleton:torch.nn.SiLU\n"
        "b: !singleton:torch.nn:Module.train\n"
        "c: !singleton:./mods/x.py:Thing\n"
        "d: !singleton:.mymod:Thing\n",
    )
    assert [target(graph, k).spec for k in "abcd"] == [
        "torch.nn.SiLU",
        "torch.nn:Module.train",
        "./mods/x.py:Thing",
        ".mymod:Thing",
    ]


def test_sequence_gives_positional_arguments(tmp_path):
    graph = graph_of(tmp_path, "a: !singleton:m:F\n  - 1\n  - x\n  - [2, 3]\n")
    node = target(graph, "a")
    assert node.args == ["a.arg0", "a.arg1", "a.arg2"]
    assert values(graph, node.args[:2]) == [1, "x"]
    inner = graph.node(node.args[2])
    assert inner.kind == "list"
    assert values(graph, inner.args) == [2, 3]


def test_scalar_gives_one_positional_argument(tmp_path):
    graph = graph_of(
        tmp_path, "a: !singleton:m:F 5\nb: !singleton:m:F 'text'\nc: !singleton:m:F ''\n"
    )
    assert values(graph, target(graph, "a").args) == [5]
    assert values(graph, target(graph, "b").args) == ["text"]
    assert values(graph, target(graph, "c").args) == [""]  # a quoted empty string is an argument


def test_empty_scalar_gives_no_arguments(tmp_path):
    graph = graph_of(tmp_path, "a: !factory:torch.nn:ReLU\nb: !singleton:m:F\nc: 1\n")
    for name in "ab":
        node = target(graph, name)
        assert (node.args, node.kwargs) == ([], {})


def test_mapping_gives_keyword_arguments(tmp_path):
    graph = graph_of(
        tmp_path, "a: !partial:torch.optim:AdamW\n    lr: 1.0e-3\n    weight_decay: 0\n"
    )
    node = target(graph, "a")
    assert node.args == []
    assert node.kwargs == {"lr": "a.lr", "weight_decay": "a.weight_decay"}
    assert kwvalues(graph, node) == {"lr": 0.001, "weight_decay": 0}


def test_argn_keys_become_positional_in_numeric_order(tmp_path):
    graph = graph_of(
        tmp_path,
        "b: !call:m:F\n    arg2: c\n    bias: false\n    arg0: a\n    arg10: k\n"
        "    arg1: b\n    arg3: d\n    arg4: e\n    arg5: f\n    arg6: g\n"
        "    arg7: h\n    arg8: i\n    arg9: j\n",
    )
    node = target(graph, "b")
    assert values(graph, node.args) == list("abcdefghijk")
    assert kwvalues(graph, node) == {"bias": False}


def test_argn_keys_with_a_gap_are_an_error(tmp_path):
    exc = load_error(tmp_path, "x: 1\nb: !call:m:F {arg0: 1, arg2: 3}\n")
    assert "arg0..arg1" in exc.diagnostics[0].message
    assert exc.diagnostics[0].loc.line == 2


def test_args_and_kwargs_form(tmp_path):
    graph = graph_of(tmp_path, "l: !singleton:m:F\n    args: [1, 2]\n    kwargs: {x: 3, args: 4}\n")
    node = target(graph, "l")
    assert values(graph, node.args) == [1, 2]
    assert kwvalues(graph, node) == {"x": 3, "args": 4}
    only_args = target(graph_of(tmp_path, "l: !singleton:m:F {args: [7]}\n"), "l")
    assert only_args.kwargs == {} and len(only_args.args) == 1
    graph = graph_of(tmp_path, "l: !singleton:m:F {kwargs: {y: 8}}\n")
    assert kwvalues(graph, target(graph, "l")) == {"y": 8}


def test_args_key_beside_other_keys_is_a_keyword(tmp_path):
    graph = graph_of(tmp_path, "l: !singleton:m:F {args: 1, other: 2}\n")
    node = target(graph, "l")
    assert node.args == []
    assert kwvalues(graph, node) == {"args": 1, "other": 2}


def test_args_must_be_a_sequence(tmp_path):
    exc = load_error(tmp_path, "l: !singleton:m:F\n    args: 1\n")
    assert exc.diagnostics[0].message == "'args' must be a sequence"
    assert exc.diagnostics[0].loc.line == 2


def test_call_tag_without_spec_is_an_error(tmp_path):
    exc = load_error(tmp_path, "a: 1\nb: !singleton {x: 1}\n")
    assert "needs a callable spec" in exc.diagnostics[0].message
    assert exc.diagnostics[0].loc.line == 2


# --- !var --------------------------------------------------------------------------------------


def test_var_three_forms(tmp_path):
    graph = graph_of(
        tmp_path,
        "f: !var lr\ng: !var {name: wd, default: 0.1}\nh: !var [bs, 7]\ni: !var [only]\n",
    )
    f, g, h, i = (target(graph, k) for k in "fghi")
    assert (f.kind, f.value, f.default) == ("var", "lr", None)
    assert (g.kind, g.value, g.default) == ("var", "wd", "g.default")
    assert graph.node(g.default).value == 0.1
    assert (h.kind, h.value, h.default) == ("var", "bs", "h.default")
    assert graph.node(h.default).value == 7
    assert (i.kind, i.value, i.default) == ("var", "only", None)


def test_var_with_structured_default(tmp_path):
    graph = graph_of(
        tmp_path, "v: !var\n    name: opt\n    default: !partial:torch.optim:SGD {lr: 1}\n"
    )
    node = target(graph, "v")
    default = graph.node(node.default)
    assert (default.kind, default.mode, default.spec) == ("call", "partial", "torch.optim:SGD")


def test_var_mapping_with_unknown_key_is_an_error(tmp_path):
    exc = load_error(tmp_path, "a: 1\nv: !var {name: x, value: 3}\n")
    assert "!var mapping needs 'name'" in exc.diagnostics[0].message
    assert exc.diagnostics[0].loc.line == 2


def test_var_with_too_long_sequence_is_an_error(tmp_path):
    exc = load_error(tmp_path, "v: !var [a, 1, 2]\n")
    assert exc.diagnostics[0].loc.line == 1


# --- containers --------------------------------------------------------------------------------


def test_container_tags(tmp_path):
    graph = graph_of(tmp_path, "i: !dict {a: 1, b: x}\nj: !list [1, 2]\nk: !tuple [0.9, 0.95]\n")
    i, j, k = (target(graph, n) for n in "ijk")
    assert (i.kind, kwvalues(graph, i)) == ("dict", {"a": 1, "b": "x"})
    assert i.kwargs == {"a": "i.a", "b": "i.b"}
    assert (j.kind, values(graph, j.args)) == ("list", [1, 2])
    assert j.args == ["j.0", "j.1"]
    assert (k.kind, values(graph, k.args)) == ("tuple", [0.9, 0.95])


def test_untagged_collections(tmp_path):
    graph = graph_of(tmp_path, "m:\n  a: 1\n  b: [x, y]\n")
    m = target(graph, "m")
    assert m.kind == "dict"
    b = graph.node(m.kwargs["b"])
    assert (b.kind, b.id, values(graph, b.args)) == ("list", "m.b", ["x", "y"])


def test_dict_tag_needs_a_mapping(tmp_path):
    exc = load_error(tmp_path, "a: 1\nd: !dict [1]\n")
    assert exc.diagnostics[0].message == "!dict needs a mapping"
    assert exc.diagnostics[0].loc.line == 2


# --- names and sharing -------------------------------------------------------------------------


def test_at_name_on_calls_and_containers(tmp_path):
    graph = graph_of(
        tmp_path,
        "o: !singleton:torch.nn:Linear@proj {in_features: 1}\n"
        "m: !dict:@cfg {q: 1}\n"
        "t: !tuple:@pair [1, 2]\n",
    )
    o = target(graph, "o")
    assert (o.spec, o.name) == ("torch.nn:Linear", "proj")
    assert (target(graph, "m").kind, target(graph, "m").name) == ("dict", "cfg")
    assert (target(graph, "t").kind, target(graph, "t").name) == ("tuple", "pair")


def test_dict_at_name_without_colon(tmp_path):
    # fgc: `!dict@cfg` means `!dict:@cfg` (Forgather silently drops the name)
    graph = graph_of(tmp_path, "n: !dict@cfg {q: 1}\nl: !list@items [1]\n")
    n = target(graph, "n")
    assert (n.kind, n.name, kwvalues(graph, n)) == ("dict", "cfg", {"q": 1})
    assert (target(graph, "l").kind, target(graph, "l").name) == ("list", "items")


def test_two_nodes_with_one_name_is_an_error(tmp_path):
    exc = load_error(tmp_path, "a: !dict:@x {q: 1}\nb: !dict:@x {q: 2}\n")
    assert exc.diagnostics[0].message == "two different nodes are named @x"
    assert exc.diagnostics[0].loc.line == 2


def test_alias_of_named_node_is_not_a_second_name(tmp_path):
    graph = graph_of(tmp_path, "a: &a !dict:@x {q: 1}\nb: *a\n")
    assert graph.targets == {"a": "a", "b": "a"}


def test_anchor_and_alias_share_one_node(tmp_path):
    graph = graph_of(
        tmp_path,
        ".d: &x !singleton:torch.nn:ReLU\n"
        "a: *x\n"
        "b: [*x, *x]\n"
        "c: !singleton:m:F\n    act: *x\n",
    )
    assert graph.definitions == {".d": ".d"}
    assert graph.targets["a"] == ".d"
    assert target(graph, "b").args == [".d", ".d"]
    assert target(graph, "c").kwargs == {"act": ".d"}
    assert graph.uses(".d") == 3


def test_first_occurrence_names_a_shared_node(tmp_path):
    graph = graph_of(tmp_path, "m:\n  inner: &s !factory:torch.nn:ReLU\nn: *s\n")
    assert graph.node("m").kwargs == {"inner": "m.inner"}
    assert graph.targets["n"] == "m.inner"
    assert graph.node("m.inner").mode == "factory"


def test_dotted_root_keys_are_definitions_not_targets(tmp_path):
    graph = graph_of(tmp_path, ".define: &x 1\nmodel: *x\n")
    assert list(graph.targets) == ["model"]
    assert list(graph.definitions) == [".define"]


def test_target_order_is_document_order(tmp_path):
    graph = graph_of(tmp_path, "b: 1\na: 2\n.c: 3\nd: 4\n")
    assert list(graph.targets) == ["b", "a", "d"]


# --- YAML 1.2 scalars --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 0.0001),
        ("1.0e-3", 0.001),
        ("1E5", 100000.0),
        ("-2.5", -2.5),
        (".5", 0.5),
        ("0x10", 16),
        ("0o17", 15),
        ("42", 42),
        ("-3", -3),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("~", None),
        ("null", None),
        ("Null", None),
        ("", None),
        ("true", True),
        ("True", True),
        ("false", False),
        ("'1e-4'", "1e-4"),
        ('"0x10"', "0x10"),
        ("'null'", "null"),
        ("'true'", "true"),
        ("1:30", "1:30"),
        ("2024-01-01", "2024-01-01"),
        ("017", 17),  # YAML 1.2 core: decimal, not octal
    ],
)
def test_yaml_12_core_scalars(tmp_path, text, value):
    graph = graph_of(tmp_path, f"v: {text}\n")
    got = target(graph, "v").value
    assert got == value and type(got) is type(value)


def test_special_floats(tmp_path):
    graph = graph_of(tmp_path, "a: .inf\nb: -.inf\nc: .nan\n")
    assert target(graph, "a").value == math.inf
    assert target(graph, "b").value == -math.inf
    assert math.isnan(target(graph, "c").value)


def test_scalars_inside_call_arguments_follow_yaml_12(tmp_path):
    graph = graph_of(
        tmp_path, "a: !partial:m:F {lr: 1e-4, n: 0x10, flag: yes}\nb: !singleton:m:F 1e-4\n"
    )
    assert kwvalues(graph, target(graph, "a")) == {"lr": 0.0001, "n": 16, "flag": "yes"}
    assert values(graph, target(graph, "b").args) == [0.0001]


def test_block_scalar_is_a_string(tmp_path):
    graph = graph_of(tmp_path, "a: |\n  1e-4\n")
    assert target(graph, "a").value == "1e-4\n"


# --- duplicate keys ----------------------------------------------------------------------------


def test_duplicate_key_in_one_file_is_an_error_at_the_second_key(tmp_path):
    exc = load_error(tmp_path, "c:\n  x: 1\n  y: 2\n  x: 3\n")
    assert len(exc.diagnostics) == 1
    diag = exc.diagnostics[0]
    assert diag.message.startswith("duplicate key 'x' (first set at ")
    assert (diag.loc.file, diag.loc.line) == (str((tmp_path / "c.yaml").resolve()), 4)


def test_duplicate_keyword_argument_in_one_file_is_an_error(tmp_path):
    exc = load_error(tmp_path, "o: !partial:torch.optim:AdamW\n    lr: 1\n\n    lr: 2\n")
    assert exc.diagnostics[0].message.startswith("duplicate key 'lr'")
    assert exc.diagnostics[0].loc.line == 4


def test_duplicate_target_in_one_file_is_an_error(tmp_path):
    exc = load_error(tmp_path, "a: 1\nb: 2\na: 3\n")
    assert exc.diagnostics[0].message.startswith("duplicate target 'a'")
    assert exc.diagnostics[0].loc.line == 3


def test_duplicate_key_across_files_later_wins(tmp_path):
    write(
        tmp_path / "base.yaml",
        "[model]\nmodel: !singleton:m:Model\n    width: 8\n    depth: 2\n",
    )
    cfg = write(
        tmp_path / "child.yaml",
        '-- extends "base.yaml"\n[model]\n== super()\n    depth: 4\n',
    )
    graph = load(render(cfg))
    model = target(graph, "model")
    assert kwvalues(graph, model) == {"width": 8, "depth": 4}
    assert model.key_locs["depth"].file == str(cfg.resolve())
    assert model.key_locs["depth"].line == 4
    assert graph.node(model.kwargs["depth"]).loc.line == 4


def test_duplicate_target_across_files_later_wins(tmp_path):
    write(tmp_path / "base.yaml", "a: 1\nopt: !partial:torch.optim:AdamW {lr: 1.0}\n[more]\n")
    cfg = write(
        tmp_path / "child.yaml",
        '-- extends "base.yaml"\n[more]\nopt: !partial:torch.optim:SGD\n    lr: 2.0\n',
    )
    graph = load(render(cfg))
    assert list(graph.targets) == ["a", "opt"]
    opt = target(graph, "opt")
    assert (opt.spec, kwvalues(graph, opt)) == ("torch.optim:SGD", {"lr": 2.0})
    assert (opt.loc.file, opt.loc.line) == (str(cfg.resolve()), 3)


def test_overridden_value_leaves_no_nodes_behind(tmp_path):
    write(
        tmp_path / "base.yaml",
        "opt: !partial:torch.optim:AdamW\n    lr: 1.0\n    extra: !singleton:nonexistent.mod:X\n[more]\n",
    )
    cfg = write(
        tmp_path / "child.yaml",
        '-- extends "base.yaml"\n[more]\nopt: !partial:torch.optim:SGD\n    lr: 2.0\n',
    )
    graph = load(render(cfg))
    assert sorted(n.id for n in graph.nodes()) == ["opt", "opt.lr"]


def test_override_keeps_aliases_of_the_overridden_value(tmp_path):
    # `b: *x` refers to the anchored node, whatever later re-declares the key `a`
    write(tmp_path / "base.yaml", "a: &x !dict\n    k: 1\nb: *x\n[more]\n")
    cfg = write(tmp_path / "child.yaml", '-- extends "base.yaml"\n[more]\na: 5\nc: *x\n')
    graph = load(render(cfg))
    assert target(graph, "a").kind == "value" and target(graph, "a").value == 5
    b = target(graph, "b")
    assert (b.kind, kwvalues(graph, b)) == ("dict", {"k": 1})
    assert graph.targets["c"] == graph.targets["b"]


def test_duplicate_anchor_is_a_yaml_error_naming_both_places(tmp_path):
    exc = load_error(tmp_path, "a: &x 1\nb: &x 2\n")
    message = exc.diagnostics[0].message
    assert "duplicate anchor 'x'" in message and "c.yaml:1" in message
    assert exc.diagnostics[0].loc.line == 2


# --- errors ------------------------------------------------------------------------------------


def test_unknown_tag_at_its_line(tmp_path):
    exc = load_error(tmp_path, "a: 1\nb:\n  c: !frob 3\n")
    assert exc.diagnostics[0].message == "unknown tag !frob"
    assert exc.diagnostics[0].loc.line == 3


def test_several_loader_errors_reported_together(tmp_path):
    exc = load_error(
        tmp_path, "a: !frob 1\nb: !dict:@n {x: 1}\nc: !dict:@n {x: 2}\nd:\n  k: 1\n  k: 2\n"
    )
    assert [d.loc.line for d in exc.diagnostics] == [1, 3, 6]


def test_yaml_syntax_error_mapped_to_template_line(tmp_path):
    exc = load_error(tmp_path, "## comment\n-- set x = 1\na: 1\nb: {{ x }}: : :\n")
    assert exc.diagnostics[0].message.startswith("YAML: ")
    loc = exc.diagnostics[0].loc
    assert (loc.file, loc.line) == (str((tmp_path / "c.yaml").resolve()), 4)


def test_yaml_syntax_error_in_parent_template(tmp_path):
    parent = write(tmp_path / "p.yaml", "-- set y = 2\n[x]\nq: 1\n[y]\nz: {{ y }}: bad\nlast: 1\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n[x]\n== super()\nw: 1\n')
    with pytest.raises(FgcError) as info:
        load(render(cfg))
    loc = info.value.diagnostics[0].loc
    assert (loc.file, loc.line) == (str(parent.resolve()), 5)
    assert loc.chain == ((str(cfg.resolve()), 1),)


def test_unterminated_flow_collection_reported_where_it_opens(tmp_path):
    parent = write(tmp_path / "p.yaml", "-- set y = 2\n[x]\nq: 1\n[y]\nz: [1, {{ y }}\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n[x]\n== super()\nw: 1\n')
    with pytest.raises(FgcError) as info:
        load(render(cfg))
    diag = info.value.diagnostics[0]
    assert (diag.loc.file, diag.loc.line) == (str(parent.resolve()), 5)
    assert "while parsing a flow sequence" in diag.message


def test_yaml_syntax_error_in_child_override(tmp_path):
    write(tmp_path / "p.yaml", "a: 1\n[x]\nq: 1\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n[x]\n\nq: 1 : 2\n')
    with pytest.raises(FgcError) as info:
        load(render(cfg))
    loc = info.value.diagnostics[0].loc
    assert (loc.file, loc.line) == (str(cfg.resolve()), 4)


def test_empty_config_is_an_error(tmp_path):
    exc = load_error(tmp_path, "## nothing\n")
    assert exc.diagnostics[0].message == "the config is empty"


def test_root_must_be_a_mapping(tmp_path):
    exc = load_error(tmp_path, "- a\n- b\n")
    assert exc.diagnostics[0].message == "the config must be a mapping of targets"


# --- locations ---------------------------------------------------------------------------------


def test_every_node_location_in_a_single_file(tmp_path):
    graph = graph_of(
        tmp_path,
        "## header\n"
        "model: !singleton:m:Model\n"
        "    width: 8\n"
        "\n"
        "    layers:\n"
        "      - !factory:m:Layer\n"
        "        size: 3\n",
    )
    lines = {n.id: n.loc.line for n in graph.nodes()}
    assert lines == {
        "model": 2,
        "model.width": 3,
        "model.layers": 6,
        "model.layers.0": 6,
        "model.layers.0.size": 7,
    }
    model = target(graph, "model")
    assert {k: loc.line for k, loc in model.key_locs.items()} == {"width": 3, "layers": 5}


def test_node_locations_from_parent_and_included_templates(tmp_path):
    parent = write(
        tmp_path / "base.yaml",
        "## the parent\n"
        "-- set ns = namespace()\n"
        "[model]\n"
        "model: !singleton:m:Model\n"
        "    width: 8\n"
        "[optimizer]\n"
        "optimizer: !partial:torch.optim:SGD\n"
        "    lr: 0.1\n",
    )
    inc = write(tmp_path / "parts" / "sched.yaml", "sched: !partial:m:Sched\n    steps: 10\n")
    cfg = write(
        tmp_path / "child.yaml",
        '-- extends "base.yaml"\n'
        "[model]\n"
        "== super()\n"
        "    depth: 2\n"
        "[optimizer]\n"
        "== super()\n"
        '-- include "parts/sched.yaml"\n'
        "extra: 1\n",
    )
    graph = load(render(cfg))
    P, I, C = str(parent.resolve()), str(inc.resolve()), str(cfg.resolve())
    where = {n.id: (n.loc.file, n.loc.line) for n in graph.nodes()}
    assert where == {
        "model": (P, 4),
        "model.width": (P, 5),
        "model.depth": (C, 4),
        "optimizer": (P, 7),
        "optimizer.lr": (P, 8),
        "sched": (I, 1),
        "sched.steps": (I, 2),
        "extra": (C, 8),
    }
    assert graph.node("sched").loc.chain == ((C, 7),)
    assert graph.node("model").loc.chain == ((C, 1),)
    assert graph.node("extra").loc.chain == ()


def test_locations_inside_multiline_expression_output(tmp_path):
    graph = graph_of(tmp_path, "a: 1\nb: {{ [1,\n  2] }}\nc: 3\n")
    assert target(graph, "b").loc.line == 2
    assert target(graph, "c").loc.line == 4
