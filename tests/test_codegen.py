"""Codegen: determinism, golden packages, standalone packages, atomic output, the CLI."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLE, REPO, run_fgc, tree_bytes

GOLDEN = REPO / "golden"
BLOCKED = [
    "fgc", "fgc_lowering", "fgc_runtime", "jinja2", "yaml", "networkx", "libcst", "black", "click",
    "transformers",
]



def site_without(tmp_path: Path, blocked: list[str]) -> Path:
    """A copy (by symlinks) of site-packages without the blocked distributions, fgc included."""
    site = Path(sysconfig.get_paths()["purelib"])
    fake = tmp_path / "site"
    fake.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        top = re.split(r"[-.]", name)[0].lstrip("_")
        if top in blocked or name.endswith(".pth") or name.startswith("__editable__"):
            continue
        (fake / entry.name).symlink_to(entry)
    return fake


def build(tmp_path: Path, name: str, *defines: str, config: Path = EXAMPLE, cwd=None, env=None) -> Path:
    out = tmp_path / name
    args = ["build", config, "-o", out]
    for d in defines:
        args += ["-D", d]
    run_fgc(*args, cwd=cwd, env=env, check=True)
    return out


def test_build_layout(tmp_path):
    out = build(tmp_path, "pkg")
    for rel in [
        "train.py", "model.py", "launch.sh", "config.yaml", "manifest.json", "README.md",
        "requirements.txt", "fgc_runtime/__init__.py", "fgc_runtime/data.py", "data/meta.json",
        "data/train.bin", "data/val.bin",
    ]:
        assert (out / rel).is_file(), rel
    assert os.access(out / "launch.sh", os.X_OK)
    assert "\nnproc=2\n" in (out / "launch.sh").read_text()  # the plan's processes per node
    # torch is the one requirement; the optional packages are comments (tests/test_safety_process.py)
    required = [l for l in (out / "requirements.txt").read_text().splitlines() if not l.startswith("#")]
    assert required == ["torch>=2.4"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["trainer_type"] == "ddp"
    assert manifest["templates"] == ["train.yaml", "<fgc>/lm/llama.yaml", "<fgc>/lm/train.yaml"]
    for rel, digest in manifest["outputs"].items():
        import hashlib

        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    model_src = (out / "model.py").read_text()
    assert "class CausalLM(nn.Module)" in model_src and "def build_model(" in model_src
    assert "fgc.components" not in model_src


def test_build_is_deterministic(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    a = build(tmp_path, "a")
    b = build(tmp_path / "elsewhere", "deeper_b", cwd=tmp_path / "elsewhere", env={"PYTHONHASHSEED": "123"})
    assert tree_bytes(a) == tree_bytes(b)


def test_golden_tiny_llama_is_current(tmp_path):
    """golden/tiny_llama is what the main example builds today.

    Refresh on purpose with: python scripts/refresh_golden.py

    golden/ holds no copy of the runtime: the built fgc_runtime/ files are checked against the
    hashes golden's manifest.json lists (so a changed runtime module shows there).
    """
    out = build(tmp_path, "tiny_llama")
    golden = tree_bytes(GOLDEN / "tiny_llama")
    fresh = tree_bytes(out)
    runtime = {rel: data for rel, data in fresh.items() if rel.startswith("fgc_runtime/")}
    fresh = {rel: data for rel, data in fresh.items() if rel not in runtime}
    assert not any(rel.startswith("fgc_runtime/") for rel in golden), "golden/ holds a copy of the runtime"
    assert sorted(golden) == sorted(fresh)
    changed = [rel for rel in fresh if fresh[rel] != golden[rel]]
    assert changed == [], f"generated files differ from golden/: {changed}; run scripts/refresh_golden.py if intended"
    listed = json.loads(golden["manifest.json"])["outputs"]
    built = {rel: hashlib.sha256(data).hexdigest() for rel, data in runtime.items()}
    assert built == {rel: h for rel, h in listed.items() if rel.startswith("fgc_runtime/")}, (
        "the vendored runtime differs from golden's manifest; run scripts/refresh_golden.py if intended"
    )


def test_one_value_changes_only_its_lines(tmp_path):
    a = build(tmp_path, "a")
    b = build(tmp_path, "b", "lr=0.002")
    a_lines = (a / "train.py").read_text().splitlines()
    b_lines = (b / "train.py").read_text().splitlines()
    diff = [(x, y) for x, y in zip(a_lines, b_lines) if x != y]
    assert len(a_lines) == len(b_lines)
    # the optimizer line and the config hash; nothing else in train.py
    assert len(diff) == 2, diff
    assert any("lr=0.003" in x and "lr=0.002" in y for x, y in diff)
    assert (a / "model.py").read_bytes() == (b / "model.py").read_bytes()


def test_values_are_emitted_as_literals(tmp_path):
    weird = "it's \"quoted\" \\ {{ x }} ## not a comment\nnew line"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n== super()\n-- set ns.max_steps = 3\n"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        "    data_dir: {{ weird | toyaml }}\n"
    )
    out = tmp_path / "pkg"
    run_fgc("build", cfg, "-o", out, "-D", "weird=" + json.dumps(weird), check=True)
    tree = ast.parse((out / "train.py").read_text())
    values = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DATA_DIR"
    ]
    assert values == [weird]


def test_generated_package_runs_without_build_time_packages(tmp_path):
    """The package needs only torch: fgc, jinja2, yaml, networkx, libcst, black, click and
    transformers are made unimportable, and every import in it is stdlib, torch or its own."""
    out = build(tmp_path, "pkg", "trainer_type=basic", "max_steps=4", "log_every=2", "eval_every=2")
    copy = tmp_path / "copied"
    shutil.copytree(out, copy)
    shutil.rmtree(out)  # nothing may refer back to the build directory
    env = dict(os.environ, PYTHONPATH=str(site_without(tmp_path, BLOCKED)))
    check = subprocess.run(
        [sys.executable, "-S", "-c", "import importlib.util as u, sys; "
         "sys.exit(any(u.find_spec(m) for m in sys.argv[1:]))", *BLOCKED],
        cwd=tmp_path, env=env,
    )
    assert check.returncode == 0, "the blocked packages are still importable"
    proc = subprocess.run(
        [sys.executable, "-S", str(copy / "train.py"), "--output-dir", str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4]  # step 1: the starting loss
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4]
    # every import of the package is standard library, torch, or the package itself; the optional
    # extras (tokenizers for sampling, jinja2 for chat templates, torchao for --quantize) only
    # inside functions, and triton only in fgc_runtime/kernels/triton/, which the kernels import
    # inside functions
    own = {"fgc_runtime", "model"}
    for path in copy.rglob("*.py"):
        triton_module = path.parent.name == "triton" and path.parent.parent.name == "kernels"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and (node.module or "").startswith("triton"):
                assert node.col_offset > 0, (path, "imports the Triton kernels at module level")
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                optional = (top in ("jinja2", "tokenizers", "torchao") and node.col_offset > 0) or (top == "triton" and triton_module)
                assert top in sys.stdlib_module_names or top == "torch" or top in own or optional, (path, name)


def test_atomic_output_on_error(tmp_path):
    out = build(tmp_path, "pkg")
    before = tree_bytes(out)
    bad = run_fgc("build", EXAMPLE, "-o", out, "-D", "num_attention_heads=5")
    assert bad.returncode == 2
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temporary leftovers


def test_refuses_non_fgc_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_fgc("build", EXAMPLE, "-o", out)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "--force" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    forced = run_fgc("build", EXAMPLE, "-o", out, "--force")
    assert forced.returncode == 0, forced.stderr
    # --force adds the package and keeps what was there (issue #13)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "train.py").is_file()


def test_bad_keyword_points_at_the_config_line(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[optimizer]\n"
        "optimizer: !partial:torch.optim:AdamW@optimizer\n"
        "    lr: 0.001\n"
        "    wieght_decay: 0.1\n"
    )
    proc = run_fgc("build", cfg, "-o", tmp_path / "out")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.endswith(":5: error: torch.optim:AdamW has no parameter 'wieght_decay'"), first
    assert first.startswith(str(cfg)) or first.startswith(os.path.relpath(cfg, REPO))
    assert "did you mean 'weight_decay'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_model_shape_error_is_a_user_error(tmp_path):
    proc = run_fgc("build", EXAMPLE, "-o", tmp_path / "out", "-D", "num_attention_heads=5")
    assert proc.returncode == 2
    assert "error: num_attention_heads (5) does not divide hidden_size (96)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_smoke_check_reports_a_failing_constructor_at_its_config_line(tmp_path):
    (tmp_path / "picky.py").write_text(
        "from torch import nn\n\n"
        "class PickyMLP(nn.Module):\n"
        "    def __init__(self, hidden_size, intermediate_size):\n"
        "        super().__init__()\n"
        "        if intermediate_size % 7:\n"
        "            raise ValueError('intermediate_size must be a multiple of 7')\n"
    )
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[mlp]\n.mlp: &mlp !partial:.picky:PickyMLP@mlp_factory\n    intermediate_size: 100\n"
        "[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n    data_dir: shards\n"
    )
    proc = run_fgc("build", cfg, "-o", tmp_path / "out")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.endswith("exp.yaml:3: error: the model does not build: ValueError: intermediate_size must be a multiple of 7")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    check = run_fgc("check", cfg)
    assert check.returncode == 2 and "the model does not build" in check.stderr


def test_unknown_trainer_type_is_reported_at_the_template_line(tmp_path):
    proc = run_fgc("build", EXAMPLE, "-o", tmp_path / "out", "-D", "trainer_type=zero")
    assert proc.returncode == 2
    assert "lm/train.yaml:" in proc.stderr
    assert "trainer_type zero is not one of basic, ddp, fsdp2, pipeline, diloco" in proc.stderr


def test_fgc_data_command(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nsecond document\n")
    out = tmp_path / "shards"
    proc = run_fgc("data", tmp_path / "a.txt", "-o", out)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["eos_id"] == 256
    missing = run_fgc("data", tmp_path / "nope.txt", "-o", out)
    assert missing.returncode == 2 and "nope.txt: error:" in missing.stderr


def test_python_dash_m_and_console_script_agree():
    a = subprocess.run([sys.executable, "-m", "fgc", "--help"], capture_output=True, text=True)
    assert a.returncode == 0
    for cmd in ("build", "pp", "targets", "data", "check"):
        assert cmd in a.stdout
    exe = shutil.which("fgc")
    assert exe is not None, "the set-up command installs the fgc console script"
    b = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert b.stdout == a.stdout


USER_MLP = '''
import torch
from torch import nn

from fgc.components.mlp import SwiGLUMLP


def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


class GeluMLP(nn.Module):
    """A plain GELU MLP, the user's own."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(_gelu_tanh(self.up_proj(x)))


class Unused(nn.Module):
    pass


def linear_decay(optimizer, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps))
'''


def test_user_module_is_vendored_and_runs_after_the_project_is_gone(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "my_layers.py").write_text(USER_MLP)
    cfg = project / "exp.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n== super()\n-- set ns.max_steps = 2\n-- set ns.log_every = 1\n"
        "[mlp]\n"
        ".mlp: &mlp !partial:.my_layers:GeluMLP@mlp_factory\n"
        "    intermediate_size: 64\n"
        "[lr_scheduler]\n"
        "lr_scheduler: !partial:.my_layers:linear_decay\n"
        "    total_steps: 10\n"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        f"    text_files: [{EXAMPLE.parent / 'corpus.txt'}]\n"
    )
    out = tmp_path / "pkg"
    run_fgc("build", cfg, "-o", out, check=True)
    model_src = (out / "model.py").read_text()
    assert "# ---- vendored from my_layers.py" in model_src
    assert "class GeluMLP(nn.Module):" in model_src and "def _gelu_tanh(x):" in model_src
    assert "class Unused" not in model_src and "my_layers" not in model_src.split("# ----")[0]
    train_src = (out / "train.py").read_text()
    assert "# ---- vendored from my_layers.py\ndef linear_decay(optimizer, total_steps):" in train_src
    assert "GeluMLP" not in train_src
    shutil.rmtree(project)
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_relative_import_in_user_module_is_an_error(tmp_path):
    (tmp_path / "helper.py").write_text("from .other import thing\nclass X:\n    pass\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x: !singleton:.helper:X\n")
    proc = run_fgc("code", cfg, "--target", "x")
    assert proc.returncode == 2
    assert "c.yaml:1: error: " in proc.stderr and "relative import" in proc.stderr


def test_fgc_diff_configs_and_build_dirs(tmp_path):
    # a build directory, not golden/: golden/ holds no copy of the runtime
    same = run_fgc("diff", EXAMPLE, build(tmp_path, "pkg_a"))
    assert same.returncode == 0 and same.stdout == ""
    (tmp_path / "tiny_llama").mkdir()  # the package is named after the directory of a train.yaml
    other = tmp_path / "tiny_llama" / "train.yaml"
    other.write_text(EXAMPLE.read_text().replace("default(3.0e-3)", "default(1.0e-3)"))
    shutil.copy(EXAMPLE.parent / "corpus.txt", other.parent / "corpus.txt")
    proc = run_fgc("diff", EXAMPLE, other)
    assert proc.returncode == 1
    changed = [l for l in proc.stdout.splitlines() if l.startswith(("+", "-")) and not l.startswith(("+++", "---"))]
    assert changed == [
        "-optimizer.lr = 0.003",
        "+optimizer.lr = 0.001",
        "-    lr: 0.003",
        "+    lr: 0.001",
        '-CONFIG_HASH = "' + changed[4].split('"')[1] + '"  # sha256 of the rendered config',
        changed[5],
        "-    torch.optim.AdamW, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1",
        "+    torch.optim.AdamW, lr=0.001, betas=(0.9, 0.95), weight_decay=0.1",
    ]
    built = build(tmp_path, "pkg_b", config=other)
    assert run_fgc("diff", GOLDEN / "tiny_llama", built).returncode == 1
    assert run_fgc("diff", EXAMPLE, tmp_path / "nope").returncode == 2


def test_fgc_diff_against_golden_compares_the_runtime_by_its_hash(tmp_path):
    # golden/ lists its vendored runtime by hash only: the example's package matches it entirely
    same = run_fgc("diff", EXAMPLE, GOLDEN / "tiny_llama")
    assert (same.returncode, same.stdout) == (0, ""), same.stdout[:2000]
    pkg = build(tmp_path, "pkg")
    (pkg / "fgc_runtime" / "log.py").write_text((pkg / "fgc_runtime" / "log.py").read_text() + "# edited\n")
    proc = run_fgc("diff", GOLDEN / "tiny_llama", pkg)
    assert proc.returncode == 1
    assert proc.stdout == (
        f"Files a/fgc_runtime/log.py and b/fgc_runtime/log.py differ ({GOLDEN / 'tiny_llama'} keeps only its hash)\n"
    )


def test_user_module_importing_a_sibling_module_is_an_error(tmp_path):
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "layers.py").write_text(
        "import helpers\n\nclass X:\n    def __init__(self):\n        self.v = helpers.double(1)\n"
        "\nclass Fine:\n    pass\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x: !singleton:.layers:X\nok: !singleton:.layers:Fine\n")
    proc = run_fgc("code", cfg, "--target", "x", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "imports 'helpers', another module of your project" in proc.stderr
    fine = run_fgc("code", cfg, "--target", "ok", env={"PYTHONPATH": str(tmp_path)})
    assert fine.returncode == 0, fine.stderr
    assert "class Fine" in fine.stdout and "helpers" not in fine.stdout


# Any string or number a config holds reaches generated code as the same value, and the code compiles.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ODD = st.sampled_from(['"""', "'''", "\\", "\\n", "\n", "{{ x }}", "{%", "##", "#", "'", '"', "é", "\u2028", "\x00", "\t"])
config_strings = st.one_of(st.text(min_size=1, max_size=40), st.lists(ODD, min_size=1, max_size=5).map("".join))
# an optimizer's lr: any number the optimizer accepts (a negative one is a build error)
config_numbers = st.one_of(
    st.integers(min_value=0, max_value=10**25), st.floats(min_value=0.0, allow_nan=False, allow_infinity=True)
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=config_strings, number=config_numbers)
def test_values_survive_into_generated_code(tmp_path_factory, text, number):
    from fgc.build import compile_config
    from fgc.codegen.package import PackageBuilder

    tmp = tmp_path_factory.mktemp("lit")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[optimizer]\n"
        "optimizer: !partial:torch.optim:AdamW@optimizer\n"
        "    lr: {{ number | toyaml }}\n"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        "    data_dir: {{ text | toyaml }}\n"
    )
    compiled = compile_config(cfg, variables={"text": text, "number": number})
    files = PackageBuilder(compiled.program).build().files
    source = files["train.py"].decode()
    tree = ast.parse(source)  # compiles
    namespace: dict = {}
    for node in tree.body:  # evaluate the constants and the optimizer partial, as the package would
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("DATA_DIR", "optimizer_factory"):
            exec(compile(ast.Module([node], []), "<train.py>", "exec"), {"functools": __import__("functools"), "torch": __import__("torch")}, namespace)
    assert namespace["DATA_DIR"] == text
    lr = namespace["optimizer_factory"].keywords["lr"]
    assert lr == number and type(lr) is type(number)


def test_constants_name_the_line_that_set_them(tmp_path):
    out = build(tmp_path, "pkg", "batch_size=32")
    lines = (out / "train.py").read_text().splitlines()
    example = EXAMPLE.read_text().splitlines()
    max_steps_line = next(i for i, l in enumerate(example, 1) if "ns.max_steps =" in l)
    batch_line = next(i for i, l in enumerate(example, 1) if "ns.batch_size =" in l)
    assert f"MAX_STEPS = 300  # train.yaml:{max_steps_line}" in lines
    assert f"GLOBAL_BATCH_SIZE = 32  # -D batch_size=32 (train.yaml:{batch_line})" in lines
    assert "DEVICE = \"auto\"  # default of DDPTrainer.device" in lines
