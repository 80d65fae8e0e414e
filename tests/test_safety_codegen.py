"""Names in generated code (issue #13, item 9): folder, file, template, text-file and target names
reach generated Python, shell and Markdown only through fgc.codegen.escape, so a hostile name can
neither end a comment or docstring early nor add a statement, and launch.sh runs nothing of it."""

from __future__ import annotations

import ast
import json
import keyword
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jinja2.nodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_fgc
from fgc.build import compile_config
from fgc.codegen import escape
from fgc.codegen.package import TEMPLATES_DIR, PackageBuilder, _jinja
from fgc.inspect import construction_module, load_for_code

CORPUS = "\n\n".join(f"line {i}: pack my box with five dozen liquor jugs." for i in range(60))
PAYLOAD = 'import os; os.system("touch MARKER")'


# ---- helpers ---------------------------------------------------------------------------------------


def yaml_string(text: str) -> str:
    """TEXT as a YAML double-quoted scalar with every character that is not a letter or digit
    escaped, so that neither jinja (the config is a template) nor YAML reads anything in it."""
    out = []
    for char in text:
        point = ord(char)
        if char.isascii() and char.isalnum():
            out.append(char)
        elif point < 0x100:
            out.append(f"\\x{point:02x}")
        elif point < 0x10000:
            out.append(f"\\u{point:04x}")
        else:
            out.append(f"\\U{point:08x}")
    return '"' + "".join(out) + '"'


def hostile_project(
    root: Path,
    folder: str = "cfgdir",
    stem: str = "train",
    text_file: str = "corpus.txt",
    include: str = "inc",
    target: str = "extra",
) -> tuple[Path, Path]:
    """A small DDP config ROOT/FOLDER/STEM.yaml reading TEXT_FILE, extending base.yaml from the
    include folder ROOT/include/INCLUDE (which sets max_steps and the optimizer, a function of its
    own module) and defining one more target named TARGET. Returns (config, include folder)."""
    inc = root / "include" / include
    inc.mkdir(parents=True)
    (inc / "fgc_safety_opt.py").write_text(
        "import torch\n\n\n"
        "def make_optimizer(params, lr):\n"
        '    """AdamW, from a module of the include folder."""\n'
        "    return torch.optim.AdamW(params, lr=lr)\n"
    )
    (inc / "base.yaml").write_text(
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.max_steps = max_steps | default(3)\n"
        '-- set ns.trainer_type = trainer_type | default("ddp")\n'
        "[optimizer]\n"
        "optimizer: !partial:.fgc_safety_opt:make_optimizer@optimizer\n"
        "    lr: 1.0e-3\n"
    )
    directory = root / folder
    directory.mkdir(parents=True)
    (directory / text_file).write_text(CORPUS)
    config = directory / f"{stem}.yaml"
    config.write_text(
        '-- extends "base.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.hidden_size = 32\n"
        "-- set ns.num_hidden_layers = 1\n"
        "-- set ns.seq_len = 16\n"
        "-- set ns.batch_size = 4\n"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        f"    text_files: [{yaml_string(text_file)}]\n"
        "[trainer]\n"
        "== super()\n"
        f"{yaml_string(target)}: !singleton:torch.nn:Linear [2, 3]\n"
    )
    return config, inc


def build_files(config: Path, inc: Path) -> dict[str, bytes]:
    """The package files of CONFIG, built in this process (no smoke check: nothing generated runs)."""
    saved = set(sys.modules)
    try:
        compiled = compile_config(config, (str(inc),))
        return PackageBuilder(compiled.program).build().files
    finally:
        for name in set(sys.modules) - saved:  # the include folder's module, loaded by name
            if name.startswith("fgc_user_"):
                del sys.modules[name]


def code_module(config: Path, inc: Path, target: str) -> str:
    """What `fgc code CONFIG -I INC --target TARGET` prints."""
    rendered, ir, ctx = load_for_code(config, (str(inc),))
    return construction_module(ir, ctx, [target], rendered.source.path.name)


class _Strings(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant("") if isinstance(node.value, str) else node


def shape(source: str) -> str:
    """The module's syntax tree with every string constant emptied: what a name can change."""
    return ast.dump(_Strings().visit(ast.parse(source)))


def node_types(source: str) -> list[str]:
    """The module's syntax node types in walk order (names and values aside)."""
    return [type(node).__name__ for node in ast.walk(ast.parse(source))]


def dry_run(launch: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(launch), "--dry-run"], cwd=cwd, capture_output=True, text=True)


# ---- the escaping functions --------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=()), max_size=40) | st.lists(
    st.sampled_from(['"""', "'''", "\\", "\n", "\r", "\x85", "\u2028", "\x00", "\udcff", "`", "#", "a", " ", "\t"]),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_python_escapes_keep_text_inside_its_place(text):
    comment = escape.python_comment(text)
    assert comment.isprintable() and len(f"x{comment}x".splitlines()) == 1
    assert ast.dump(ast.parse(f"x = 1  # {comment}\ny = 2")) == ast.dump(ast.parse("x = 1\ny = 2"))
    inside = escape.python_docstring(text)
    bare = re.sub(r"\\.", "", inside)  # what is left outside escape sequences
    assert inside.isprintable() and '"' not in bare and "'" not in bare and "\\" not in bare
    for quote in ('"""', "'''", '"', "'"):
        assert ast.literal_eval(f"{quote}<{inside}>{quote}") == f"<{text}>"  # the value is the text
    assert ast.literal_eval(escape.python_literal(text)) == text
    name = escape.python_identifier(text)
    assert name.isidentifier() and not keyword.iskeyword(name) and escape.is_python_name(name)
    assert escape.python_comment(text) == comment and escape.python_docstring(text) == inside  # pure


@settings(max_examples=300, deadline=None)
@given(TEXT.filter(lambda t: "\x00" not in t and "\udcff" not in t))
def test_shell_word_reads_back_as_one_word(text):
    assert shlex.split(escape.shell_word(text)) == [text]
    comment = escape.shell_comment(text)
    assert comment.isprintable() and "\n" not in comment


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_markdown_stays_on_its_line(text):
    for out in (escape.markdown_text(text), escape.markdown_code(text)):
        assert out.isprintable() and len(f"x{out}x".splitlines()) == 1
    code = escape.markdown_code(text)
    fence = len(code) - len(code.lstrip("`"))
    inner = code[fence:-fence]
    assert "`" * fence not in inner  # nothing inside can close the span early


def test_escaping_examples():
    assert escape.python_docstring('a"""b\nc') == 'a\\"\\"\\"b\\nc'
    assert escape.python_comment("x\ny\u2028z\\") == "x\\ny\\u2028z\\\\"
    assert escape.shell_word("$(touch M)") == "'$(touch M)'"
    assert escape.markdown_text("tiny_llama *x* _y_ <b>") == "tiny_llama \\*x\\* \\_y\\_ \\<b\\>"
    assert escape.markdown_code("a`b") == "``a`b``"
    assert escape.markdown_code("`a") == "`` `a ``"
    assert escape.python_identifier("model.layer_factory") == "model_layer_factory"
    assert escape.python_identifier("class") == "class_"
    assert escape.python_identifier("x²") == "x2"  # as Python reads it (NFKC)
    assert escape.python_identifier("2x") == "_2x"
    assert not escape.is_python_name("ﬁ") and not escape.is_python_name("__debug__")


# ---- every {{ }} of a codegen template prints through an escaping filter -------------------------------

# Expressions whose value is code fgc made (libcst output, literals, import lines, vendored source,
# Python names) and so is printed as it is; everything else a template prints goes through a filter.
CODE_VALUED = {
    "model.py.j2": {"line", "source", "model_var"},
    "train.py.j2": {
        "line", "source", "name", "value", "plan_literal", "config_hash", "factories", "loss_fn",
        "train_module", "sample_module", "sync_function", "params_module", "clip_norm_arg", "pipeline_loss",
    },
    "launch.sh.j2": set(),
    "README.md.j2": set(),
    "generate.py.j2": {"name", "value"},
}


def _dotted(node) -> str | None:
    if isinstance(node, jinja2.nodes.Name):
        return node.name
    if isinstance(node, jinja2.nodes.Getattr):
        base = _dotted(node.node)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _unescaped(node, allowed: set[str], used: set[str]) -> list[str]:
    """The printed expressions under NODE that are neither escaped, constant nor code-valued."""
    if isinstance(node, (jinja2.nodes.TemplateData, jinja2.nodes.Const)):
        return []
    if isinstance(node, jinja2.nodes.Filter) and node.name in escape.FILTERS:
        return []
    if isinstance(node, jinja2.nodes.CondExpr):  # `"a" if flag else "b"`: only the branches print
        branches = [node.expr1] + ([node.expr2] if node.expr2 is not None else [])
        return [bad for branch in branches for bad in _unescaped(branch, allowed, used)]
    name = _dotted(node)
    if name is not None and name in allowed:
        used.add(name)
        return []
    return [name or type(node).__name__]


def test_every_printed_template_expression_is_escaped():
    env = _jinja()
    templates = sorted(p.name for p in TEMPLATES_DIR.glob("*.j2"))
    assert set(templates) == set(CODE_VALUED), "a new template: list its code-valued names here"
    # train.py's features (fgc/codegen/features.py) render in its context, under its list
    features = sorted(f"features/{p.name}" for p in (TEMPLATES_DIR / "features").glob("*.j2"))
    assert features
    for template in templates:
        used: set[str] = set()
        for path in [template] + (features if template == "train.py.j2" else []):
            tree = env.parse((TEMPLATES_DIR / path).read_text(encoding="utf-8"))
            bad = []
            for output in tree.find_all(jinja2.nodes.Output):
                for child in output.nodes:
                    bad += [f"line {child.lineno}: {{{{ {b} }}}}" for b in _unescaped(child, CODE_VALUED[template], used)]
            assert not bad, f"{path} prints text without an escaping filter of fgc.codegen.escape: {bad}"
        assert used == CODE_VALUED[template], f"{template}: unused code-valued names {CODE_VALUED[template] - used}"


def test_the_checker_catches_an_unescaped_name():
    tree = _jinja().parse('# {{ config_name }} {{ "a" if x else b }} {{ line }} {{ x | python_comment }}')
    children = [c for o in tree.find_all(jinja2.nodes.Output) for c in o.nodes]
    bad = [b for c in children for b in _unescaped(c, {"line"}, set())]
    assert bad == ["config_name", "b"]


# ---- the reported cases --------------------------------------------------------------------------------


def run_help(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python OUT/train.py --help`` in CWD: runs every statement at the top of train.py."""
    return subprocess.run([sys.executable, out / "train.py", "--help"], cwd=cwd, capture_output=True, text=True)


def test_config_folder_with_triple_quotes_stays_in_the_docstrings(tmp_path):
    folder = 'x"""+__import__("os").system("touch MARKER")+"""'
    config, inc = hostile_project(tmp_path, folder=folder)
    out = tmp_path / "out"
    proc = run_fgc("build", config, "-I", inc, "-o", out, cwd=tmp_path)  # the smoke check runs model.py
    assert not (tmp_path / "MARKER").exists()
    assert proc.returncode == 0, proc.stderr
    help_run = run_help(out, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    assert help_run.returncode == 0, help_run.stderr
    for name in ("model.py", "train.py"):
        docstring = ast.get_docstring(ast.parse((out / name).read_text()), clean=False)
        assert f"`{folder}`" in docstring.splitlines()[0], name  # the docstring holds the name exactly
    assert (out / "README.md").read_text().startswith('# x"""+\\_\\_import\\_\\_("os").system("touch MARKER")+"""\n')


def test_newline_in_folder_name_runs_nothing_from_launch_sh(tmp_path):
    folder = "x\ntouch MARKER\n#"
    config, inc = hostile_project(tmp_path, folder=folder)
    out = tmp_path / "out"
    proc = run_fgc("build", config, "-I", inc, "-o", out, "--no-smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launch = out / "launch.sh"
    assert subprocess.run(["bash", "-n", launch]).returncode == 0
    run = dry_run(launch, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    assert run.returncode == 0, run.stderr
    assert launch.read_text().splitlines()[1].startswith("# Launch the trainer of `x\\ntouch MARKER\\n#` ")


def test_text_files_entry_with_newline_adds_no_code(tmp_path):
    text_file = f"c\n{PAYLOAD}\n#.txt"
    config, inc = hostile_project(tmp_path, text_file=text_file)
    out = tmp_path / "out"
    proc = run_fgc("build", config, "-I", inc, "-o", out, "--no-smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    help_run = run_help(out, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    assert help_run.returncode == 0, help_run.stderr
    train = (out / "train.py").read_text()
    assert '# shipped in this package, made from c\\nimport os; os.system("touch MARKER")\\n#.txt\n' in train
    readme = (out / "README.md").read_text()
    assert '- Data: `data/`, the byte-tokenized text of `c\\nimport os; os.system("touch MARKER")\\n#.txt`.\n' in readme


def test_include_folder_with_newline_adds_no_code(tmp_path):
    include = f"inc\n{PAYLOAD}\n#"
    config, inc = hostile_project(tmp_path, include=include)
    out = tmp_path / "out"
    proc = run_fgc("build", config, "-I", inc, "-o", out, "--no-smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    help_run = run_help(out, tmp_path)
    assert not (tmp_path / "MARKER").exists()
    assert help_run.returncode == 0, help_run.stderr
    train = (out / "train.py").read_text()
    shown = '../include/inc\\nimport os; os.system("touch MARKER")\\n#'
    assert f"MAX_STEPS = 3  # {shown}/base.yaml:4\n" in train  # a setting's origin
    assert f"# optimizer: {shown}/base.yaml:7\n" in train  # a target's origin
    assert f"# ---- vendored from {shown}/fgc_safety_opt.py\n" in train  # a vendored module


def test_fgc_code_target_with_triple_quotes_stays_in_the_docstring(tmp_path):
    target = 't"""+__import__("os").system("touch MARKER")+"""'
    config = tmp_path / "cfg.yaml"
    config.write_text(f"{yaml_string(target)}: !singleton:torch.nn:Linear [2, 3]\n")
    proc = run_fgc("code", config, "--target", target, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    module = tmp_path / "construct.py"
    module.write_text(proc.stdout)
    run = subprocess.run([sys.executable, module], cwd=tmp_path, capture_output=True, text=True)
    assert not (tmp_path / "MARKER").exists()
    assert run.returncode == 0, run.stderr
    docstring = ast.get_docstring(ast.parse(proc.stdout), clean=False)
    assert docstring == f"Construct target {target!r} of cfg.yaml, as fgc reads the config."


def test_fgc_code_makes_python_names_of_any_key(tmp_path):
    # a target named x² becomes the variable x2 (Python reads names NFKC-normalised); keyword
    # arguments that are not plain Python names (__debug__, a ligature Python would read as "fi")
    # are passed as a dict, so each reaches the callable under its own name
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"{yaml_string('x²')}:\n"
        "  !singleton:builtins:dict\n"
        f"    {yaml_string('__debug__')}: 1\n"
        f"    {yaml_string('ﬁ')}: 2\n"
        "    plain: 3\n"
    )
    proc = run_fgc("code", config, "--target", "x²", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    namespace: dict = {}
    exec(compile(proc.stdout, "construct.py", "exec"), namespace)
    assert namespace["construct"]() == {"__debug__": 1, "ﬁ": 2, "plain": 3}
    assert "    x2 = builtins.dict(" in proc.stdout


# ---- property: hostile names change no statement ------------------------------------------------------

# Filesystem names hold neither NUL nor '/'; everything else may come.
PIECES = [
    '"""', "'''", "\\", "\n", "\r", "$(touch MARKER)", "`touch MARKER`", ";", "#", "\u2028", "\x85",
    "'", '"', "*", "_", "{{", "%}", " ", "\t", "é", "a",
]
NAME = st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("".join).filter(
    lambda s: s.strip() not in ("", ".", "..") and len(s.encode()) < 200
)
PLAIN = {"folder": "cfgdir", "stem": "cfg", "text_file": "corpus.txt", "include": "inc", "target": "extra"}
_baseline: dict[str, object] = {}


def baseline() -> dict[str, object]:
    """The generated files of the project with plain names (built once)."""
    if not _baseline:
        with tempfile.TemporaryDirectory() as tmp:
            config, inc = hostile_project(Path(tmp), **PLAIN)
            _baseline["files"] = build_files(config, inc)
            _baseline["code"] = code_module(config, inc, PLAIN["target"])
    return _baseline


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(folder=NAME, stem=NAME | st.just("train"), text=NAME, include=NAME, target=NAME.filter(lambda s: s[0] != "."))
def test_hostile_names_add_no_statement(folder, stem, text, include, target):
    # every generated .py file parses to the tree of the plain-named build (strings aside),
    # launch.sh and README.md keep their line counts, and launch.sh --dry-run runs nothing of a name
    plain = baseline()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, inc = hostile_project(root / "p", folder, stem, text + ".txt", include, target)
        files = build_files(config, inc)
        for rel in sorted(files):
            if rel.startswith("fgc_runtime/"):  # copied as it is
                assert files[rel] == plain["files"][rel], rel
            elif rel.endswith(".py"):
                assert shape(files[rel].decode()) == shape(plain["files"][rel].decode()), rel
        for rel in ("README.md", "launch.sh"):
            assert files[rel].count(b"\n") == plain["files"][rel].count(b"\n"), rel
        json.loads(files["manifest.json"])
        launch = root / "launch.sh"
        launch.write_bytes(files["launch.sh"])
        assert subprocess.run(["bash", "-n", launch]).returncode == 0
        assert dry_run(launch, root).returncode == 0
        assert not any("MARKER" in names for _, _, names in os.walk(root))
        code = code_module(config, inc, target)
        assert node_types(code) == node_types(plain["code"])
        assert f"Construct target {target!r} of {stem}.yaml," in ast.get_docstring(ast.parse(code), clean=False)
        shown = folder if stem == "train" else stem
        docstring = ast.get_docstring(ast.parse(files["model.py"].decode()), clean=False)
        assert docstring.startswith(f"The model of `{shown}`, generated by fgc ")
