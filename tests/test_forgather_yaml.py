"""The YAML side of Forgather's dialect as its projects write it (issue #17): merge keys, repeated
``.define`` definitions, empty ``!dict``/``!list``, bare builtin specs (``!call:getitem``,
``!singleton:len``), ``!meta``, and no YAML construct read silently as something else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_fgc
from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import render
from fgc.ir import IRGraph

FORGATHER_SRC = Path("/tmp/forgather/src")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def graph_of(tmp_path: Path, text: str, name: str = "c.yaml") -> IRGraph:
    return load(render(write(tmp_path / name, text)))


def errors_of(tmp_path: Path, text: str) -> list[tuple[int, str]]:
    """(line, message) of every error loading TEXT reports."""
    with pytest.raises(FgcError) as info:
        graph_of(tmp_path, text)
    return [(d.loc.line, d.message) for d in info.value.diagnostics]


def data(graph: IRGraph, node_id: str):
    """The plain value a node of containers and scalars stands for."""
    node = graph.node(node_id)
    if node.kind == "value":
        return node.value
    if node.kind == "dict":
        return {k: data(graph, c) for k, c in node.kwargs.items()}
    if node.kind == "list":
        return [data(graph, c) for c in node.args]
    if node.kind == "tuple":
        return tuple(data(graph, c) for c in node.args)
    raise AssertionError(f"{node_id} is a {node.kind}")


def target_data(graph: IRGraph, name: str):
    return data(graph, graph.targets[name])


MERGES = (
    ".define: &base {lr: 0.1, momentum: 0.9, nesterov: false}\n"  # 1
    ".define: &more {momentum: 0.5, dampening: 0.1}\n"  # 2
    "one: !dict\n"  # 3
    "    <<: *base\n"  # 4
    "    lr: 0.2\n"  # 5
    "two:\n"  # 6
    "    <<: [*base, *more]\n"  # 7
    "three: !dlist\n"  # 8
    "    <<: {x: 1, y: 2}\n"  # 9
    "    y: 3\n"  # 10
    "    z: ~\n"  # 11
    "empty_dict: !dict\n"
    "empty_list: !list\n"
    "empty_tuple: !tuple\n"
    "empty_dlist: !dlist\n"
    "quoted_empty: !dict ''\n"
)


def test_merge_keys_merge_explicit_keys_win_and_earlier_mappings_win(tmp_path):
    graph = graph_of(tmp_path, MERGES)
    one = target_data(graph, "one")
    assert one == {"lr": 0.2, "momentum": 0.9, "nesterov": False}
    assert list(one) == ["lr", "momentum", "nesterov"]  # where each key first appears, as YAML 1.1
    two = target_data(graph, "two")
    assert two == {"momentum": 0.9, "dampening": 0.1, "lr": 0.1, "nesterov": False}
    assert list(two) == ["momentum", "dampening", "lr", "nesterov"]
    assert target_data(graph, "three") == [1, 3]  # merged x, then y overridden in place; z deleted
    assert "<<" not in graph.node("one").kwargs
    # a quoted "<<" is an ordinary key, in YAML 1.1 as in Forgather
    assert target_data(graph_of(tmp_path, 'a: {"<<": 1}\n'), "a") == {"<<": 1}


def test_merged_values_keep_the_line_that_wrote_them(tmp_path):
    graph = graph_of(tmp_path, MERGES)
    one = graph.node("one")
    cfg = str(tmp_path / "c.yaml")
    assert (one.key_locs["lr"].file, one.key_locs["lr"].line) == (cfg, 5)
    assert one.key_locs["momentum"].line == 1
    assert graph.node(one.kwargs["momentum"]).loc.line == 1
    # the merged value the explicit key replaced is recorded, as an override is
    assert [loc.line for loc in one.key_history["lr"]] == [1, 5]
    two = graph.node("two")
    assert two.key_locs["momentum"].line == 1 and two.key_locs["dampening"].line == 2


def test_merge_is_shared_like_an_alias(tmp_path):
    graph = graph_of(
        tmp_path,
        ".define: &args\n"
        "    act: !singleton:torch.nn:ReLU\n"
        "a: !singleton:torch.nn:Sequential\n"
        "    <<: *args\n"
        "b: !singleton:torch.nn:Sequential\n"
        "    <<: *args\n",
    )
    a, b = graph.node("a"), graph.node("b")
    assert a.kwargs == b.kwargs == {"act": ".define.act"}
    assert graph.node(".define.act").spec == "torch.nn:ReLU"


def test_explain_and_code_of_a_merged_optimizer(tmp_path):
    cfg = write(
        tmp_path / "opt.yaml",
        ".define: &base\n"
        "    lr: 0.1\n"
        "    momentum: 0.9\n"
        "model: !singleton:torch.nn:Linear [2, 2]\n"
        "trainer: !singleton:fgc.settings:BasicTrainer\n"
        "    data: !singleton:fgc.settings:DataSettings\n"
        "        data_dir: shards\n"
        "optimizer: !partial:torch.optim:SGD\n"
        "    <<: *base\n"
        "    lr: 0.2\n",
    )
    proc = run_fgc("explain", cfg, "optimizer.lr", check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "optimizer.lr = 0.2"
    assert lines[1].split() == ["overridden", f"{cfg}:2"]
    assert lines[2].split() == ["written", f"{cfg}:10"]
    proc = run_fgc("explain", cfg, "optimizer.momentum", check=True)
    assert proc.stdout.splitlines()[1].split() == ["written", f"{cfg}:3"]
    proc = run_fgc("code", cfg, "--target", "optimizer", check=True)
    assert "optimizer = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)" in proc.stdout


NOT_A_MAPPING = "a merge key '<<' needs a mapping or a list of mappings"
MERGE_HINT = "write <<: *defaults or <<: [*a, *b], where &defaults is a mapping"
ITSELF = "this value contains itself (an alias inside the anchor it refers to)"
ITSELF_HINT = "a config is a tree with shared parts; it cannot contain itself"


@pytest.mark.parametrize(
    "text, line, message, hint",
    [
        ("x: &x {k: 1}\na:\n    <<: 5\n", 3, NOT_A_MAPPING, MERGE_HINT),
        ("x: &x {k: 1}\na:\n    <<: [*x, 3]\n", 3, NOT_A_MAPPING, MERGE_HINT),
        (
            "x: &x {k: 1}\na:\n    k: 2\n    <<: *x\n    <<: *x\n",
            5,
            "duplicate key '<<' (first set at {cfg}:4)",
            "merge several mappings with one key: <<: [*a, *b]",
        ),
        ("a: &x [1, *x]\n", 1, ITSELF, ITSELF_HINT),
        ("a: &x {k: 1, <<: *x}\n", 1, ITSELF, ITSELF_HINT),
    ],
)
def test_bad_merges_are_errors_at_their_line(tmp_path, text, line, message, hint):
    cfg = str(tmp_path / "c.yaml")
    with pytest.raises(FgcError) as info:
        graph_of(tmp_path, text)
    got = [(d.loc.line, d.message, d.hint) for d in info.value.diagnostics]
    assert got == [(line, message.format(cfg=cfg), hint)]


def test_yaml_tags_are_honoured_or_refused_never_ignored(tmp_path):
    graph = graph_of(
        tmp_path,
        "a: !!str 1e-4\n"
        "b: !!int '7'\n"
        "c: !!float 3\n"
        "d: !!null ''\n"
        "e: !!map {k: !!seq [1]}\n"
        "f: ! 12\n"
        "g: !!str\n",
    )
    got = {t: target_data(graph, t) for t in "abcdefg"}
    assert got == {"a": "1e-4", "b": 7, "c": 3.0, "d": None, "e": {"k": [1]}, "f": "12", "g": ""}
    assert isinstance(got["c"], float)
    cfg = str(tmp_path / "c.yaml")
    errors = errors_of(
        tmp_path,
        "a: !!python/name:os.system\n"
        "b: !!python/object:collections.OrderedDict {x: 1}\n"
        "c: !!set {x, y}\n"
        "d: !!int two\n"
        "e: !!str [1]\n"
        "!dict f: 1\n"
        "? [g]\n"
        ": 1\n"
        "h: !<tag:example.com,2000:thing> 1\n",
    )
    assert errors == [
        (1, "YAML tag !!python/name:os.system is not supported"),
        (2, "YAML tag !!python/object:collections.OrderedDict is not supported"),
        (3, "YAML tag !!set is not supported"),
        (4, "!!int 'two' is not a YAML 1.2 int"),
        (5, "!!str does not fit a sequence"),
        (6, "a mapping key cannot carry the tag !dict"),
        (7, "mapping keys must be scalars"),
        (9, "YAML tag !<tag:example.com,2000:thing> is not supported"),
    ]
    assert cfg  # every error above is at the config's own file
    with pytest.raises(FgcError) as info:
        graph_of(tmp_path, "a: 1\nb: !!python/name:os.system\n")
    first = str(info.value).splitlines()[0]
    assert first == f"{cfg}:2: error: YAML tag !!python/name:os.system is not supported"


def test_repeated_define_keys_are_each_a_definition(tmp_path):
    graph = graph_of(
        tmp_path,
        ".define: &act !singleton:torch.nn:ReLU\n"
        ".define: &lin !singleton:torch.nn:Linear [2, 2]\n"
        ".define: 3\n"
        ".define_2: 4\n"
        "a: !singleton:torch.nn:Sequential [*lin, *act, *lin]\n",
    )
    assert graph.targets == {"a": "a"}
    assert graph.definitions == {
        ".define": ".define",
        ".lin": ".lin",  # named by its anchor, which names it in generated code too
        ".define_3": ".define_3",  # no anchor, and .define_2 is taken
        ".define_2": ".define_2",
    }
    assert graph.node("a").args == [".lin", ".define", ".lin"]
    assert graph.node(".lin").spec == "torch.nn:Linear"
    assert graph.node(".define_3").value == 3


def test_define_keys_across_templates(tmp_path):
    """Repeated in the child as in Forgather's model projects; the parent's keeps its meaning (a
    definition a child re-declares is overridden, as any key is), its anchor still usable."""
    write(tmp_path / "base.yaml", "[defs]\n.define: &p !singleton:torch.nn:ReLU\n[main]\n")
    graph = graph_of(
        tmp_path,
        '-- extends "base.yaml"\n'
        "[defs]\n"
        "== super()\n"
        ".define: &q !singleton:torch.nn:Tanh\n"
        ".define: &r !singleton:torch.nn:GELU\n"
        "[main]\n"
        "a: !singleton:torch.nn:Sequential [*p, *q, *r, *p, *q, *r]\n",
    )
    assert graph.targets == {"a": "a"}
    assert graph.definitions == {".define": ".define", ".r": ".r"}
    assert [graph.node(c).spec for c in graph.node("a").args[:3]] == [
        "torch.nn:ReLU",
        "torch.nn:Tanh",
        "torch.nn:GELU",
    ]


def test_ordinary_keys_written_twice_stay_errors(tmp_path):
    cfg = str(tmp_path / "c.yaml")
    assert errors_of(tmp_path, ".define: 1\n.define: 2\na: 1\na: 2\nb:\n    .x: 1\n    .x: 2\n") == [
        (4, f"duplicate target 'a' (first set at {cfg}:3)"),
        (7, f"duplicate key '.x' (first set at {cfg}:6)"),
    ]


def test_empty_container_tags_are_empty(tmp_path):
    graph = graph_of(tmp_path, MERGES)
    assert target_data(graph, "empty_dict") == {}
    assert target_data(graph, "empty_list") == []
    assert target_data(graph, "empty_tuple") == ()
    assert target_data(graph, "empty_dlist") == []
    assert target_data(graph, "quoted_empty") == {}
    assert errors_of(tmp_path, "a: !dict 5\nb: !list x\n") == [
        (1, "!dict needs a mapping"),
        (2, "!list needs a sequence"),
    ]


def test_bare_builtin_specs_resolve_and_import_as_forgather_resolves_them(tmp_path):
    cfg = write(
        tmp_path / "b.yaml",
        ".define: &d {x: 1, y: 2}\n"
        "a: !call:getitem [*d, x]\n"
        "b: !singleton:len [*d]\n"
        "c: !singleton:getattr [*d, get]\n"
        "e: !singleton:named_dict\n"
        "    z: 1\n"
        "f: !singleton:dict.fromkeys [[p, q]]\n",
    )
    expected = {
        "a": ("import operator", "operator.getitem(", 1),
        "b": ("import builtins", "builtins.len(", 2),
        "e": ("import builtins", "builtins.dict(z=1)", {"z": 1}),
        "f": ("import builtins", "builtins.dict.fromkeys(", {"p": None, "q": None}),
    }
    for name, (imports, call, value) in expected.items():
        code = run_fgc("code", cfg, "--target", name, check=True).stdout
        assert imports in code.splitlines() and call in code
        scope: dict = {}
        exec(compile(code, "construct.py", "exec"), scope)  # the generated code runs as written
        assert scope["construct"]() == value
    code = run_fgc("code", cfg, "--target", "c", check=True).stdout
    scope = {}
    exec(compile(code, "construct.py", "exec"), scope)
    assert scope["construct"]()("x") == 1


def test_bare_names_without_a_twin_are_errors_with_a_hint(tmp_path):
    cfg = write(tmp_path / "n.yaml", "a: !singleton:items [{}]\n")
    proc = run_fgc("code", cfg, "--target", "a")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"{cfg}:1: error: 'items': Forgather's bare 'items' has no importable equivalent"
    )
    assert "builtins:dict.items" in proc.stderr
    cfg = write(tmp_path / "l.yaml", "a: 1\nb: !singleton:Linear\n")
    proc = run_fgc("code", cfg, "--target", "b")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"{cfg}:2: error: malformed spec 'Linear'"


def test_meta_generate_code_is_the_source_of_a_module_that_builds_its_graph(tmp_path):
    # Forgather's one !meta function: fgc carries it out at build time with its own code writer
    cfg = write(
        tmp_path / "c.yaml",
        ".define: &model_factory !singleton:torch.nn:Linear@model_factory\n"
        "    in_features: 3\n"
        "    out_features: !var {name: width, default: 2}\n"
        "model_code_generator: !meta:forgather.codegen:generate_code@model_code_generator\n"
        "    obj: *model_factory\n"
        "    name_policy: named\n",
    )
    graph = graph_of(tmp_path, cfg.read_text())
    node = graph.node(graph.targets["model_code_generator"])
    assert (node.kind, node.mode, node.spec) == ("call", "meta", "forgather.codegen:generate_code")
    code = run_fgc("code", cfg, "--target", "model_code_generator", check=True).stdout
    scope: dict = {}
    exec(compile(code, "construct.py", "exec"), scope)
    source = scope["construct"]()  # the meta node's value: a module's source text
    assert "model_factory = torch.nn.Linear(in_features=3, out_features=width)" in source
    module: dict = {}
    exec(compile(source, "generated.py", "exec"), module)
    layer = module["construct"](width=5)  # its !vars are the construct function's parameters
    assert (layer.in_features, layer.out_features) == (3, 5)
    assert module["construct"]().out_features == 2


def test_meta_functions_fgc_does_not_carry_out_are_errors_at_their_lines(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        ".define: &m !singleton:torch.nn:Linear [2, 2]\n"
        "mine: !meta:mypkg.codegen:make [*m]\n"
        "forgathers: !meta:forgather.codegen:generate_code\n"
        "    obj: *m\n"
        "    template_name: hf_causal.py\n"
        "    model_type: custom\n"
        "nothing: !meta:forgather.codegen:generate_code {}\n",
    )
    proc = run_fgc("code", cfg, "--target", "mine")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert errors == [
        f"{cfg}:2: error: !meta:mypkg.codegen:make would run mypkg.codegen:make while compiling, on "
        "the unbuilt graph; fgc runs no project code at build time",
        f"{cfg}:5: error: generate_code's template_name is not supported: fgc writes its own "
        "construction module (as `fgc code` does), not Forgather's code templates",
        f"{cfg}:6: error: generate_code has no argument 'model_type' in fgc (Forgather passes it to "
        "a code template, which fgc does not render)",
        f"{cfg}:7: error: generate_code needs the graph to write: obj: *node",
    ]
    assert "fgc carries out these !meta functions itself: forgather.codegen:generate_code" in proc.stderr
    assert "model: *model_factory" in proc.stderr
    proc = run_fgc("code", write(tmp_path / "n.yaml", "x: !meta\n"), "--target", "x")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].endswith(
        "n.yaml:1: error: tag !meta needs a spec, e.g. !meta:forgather.codegen:generate_code"
    )


@pytest.mark.skipif(not FORGATHER_SRC.is_dir(), reason="needs a Forgather checkout at /tmp/forgather")
def test_the_same_values_as_forgathers_own_loader(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FORGATHER_SRC))
    pytest.importorskip("jinja2")
    from forgather.config import ConfigEnvironment  # noqa: PLC0415 (only where a checkout exists)

    # a text both dialects read alike (YAML 1.1 and 1.2 agree on these scalars)
    text = MERGES.replace("    z: ~\n", "")
    theirs = ConfigEnvironment().load_from_string(text).config
    graph = graph_of(tmp_path, text)
    # "two" (<<: [*a, *b] with a key in both) is left out: Forgather's answer there is PyYAML's,
    # which changed in PyYAML 6.0.4 (the later mapping wins, against YAML 1.1's merge rule, which
    # fgc follows and test_merge_keys_merge_explicit_keys_win_and_earlier_mappings_win checks)
    for name in ("one", "three", "empty_dict", "empty_list", "empty_dlist", "quoted_empty"):
        value = theirs[name]() if callable(theirs[name]) else theirs[name]  # a tag's node, or data
        assert target_data(graph, name) == value, name
        assert list(target_data(graph, name)) == list(value), name
    for name in [m for m in sys.modules if m == "forgather" or m.startswith("forgather.")]:
        del sys.modules[name]  # no other test sees it installed
