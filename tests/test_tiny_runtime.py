"""A package vendors only the runtime modules its program reaches (fgc/codegen/closure.py)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, run_fgc
from fgc.codegen.closure import ClosureError, closure, picks_triton

RUNTIME = REPO / "runtime"
SMALL = ["-D", "num_hidden_layers=2", "-D", "max_steps=2", "-D", "eval_every=2", "-D", "seq_len=32"]
TRITON = ["kernels/triton/__init__.py", "kernels/triton/_rounding.py", "kernels/triton/rms_norm.py",
          "kernels/triton/rope.py", "kernels/triton/swiglu.py", "kernels/triton/cross_entropy.py"]


def fake_runtime(root: Path, files: dict[str, str]) -> Path:
    """ROOT/rt: a runtime package of FILES (relative path → source)."""
    rt = root / "rt"
    for rel, text in files.items():
        path = rt / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return rt


# -- the closure, on a small runtime ----------------------------------------------------------------
def test_closure_follows_relative_lazy_and_cyclic_imports(tmp_path):
    rt = fake_runtime(tmp_path, {
        "__init__.py": "VERSION = 1\n",
        "a.py": """
            from .b import helper

            def later():
                from .sub import c  # imported lazily: still reachable
                return c
        """,
        "b.py": "from . import a  # a cycle: a imports b\n\ndef helper():\n    return a\n",
        "sub/__init__.py": "from .d import y\n",
        "sub/c.py": "from ..e import z\n",
        "sub/d.py": "y = 1\n",
        "e.py": "z = 2\n",
        "unused.py": "from . import e\n",
        "sub/unused.py": "",
        "other/__init__.py": "",
        "other/x.py": "",
    })
    sources = {"train.py": "from fgc_runtime import a, VERSION\n", "model.py": "import torch\n"}
    assert closure(sources, rt) == [
        "__init__.py", "a.py", "b.py", "e.py", "sub/__init__.py", "sub/c.py", "sub/d.py",
    ]
    # `import P.M` runs every package __init__ on the way; `from P.M import n`, too
    assert closure({"train.py": "import fgc_runtime.other.x\n"}, rt) == [
        "__init__.py", "other/__init__.py", "other/x.py",
    ]
    assert closure({"train.py": "def f():\n    from fgc_runtime.sub.d import y\n"}, rt) == [
        "__init__.py", "sub/__init__.py", "sub/d.py",
    ]


def test_closure_refuses_a_missing_module_and_an_unknown_import_by_name(tmp_path):
    rt = fake_runtime(tmp_path, {
        "__init__.py": "",
        "a.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n",
        "b.py": "import importlib\n\nJSON = importlib.import_module('json')\n",
    })
    with pytest.raises(ClosureError, match=r"train.py:2: imports fgc_runtime.nope, which is not a module"):
        closure({"train.py": "import torch\nfrom fgc_runtime.nope import x\n"}, rt)
    with pytest.raises(ClosureError, match=r"fgc_runtime.a:4: imports a module by a computed name"):
        closure({"train.py": "from fgc_runtime import a\n"}, rt)
    # a standard-library module named by a literal is no runtime module
    assert closure({"train.py": "from fgc_runtime import b\n"}, rt) == ["__init__.py", "b.py"]


def test_the_triton_kernels_come_only_when_the_plan_runs_triton(tmp_path):
    rt = fake_runtime(tmp_path, {
        "__init__.py": "",
        "kernels/__init__.py": "from .norm import norm\n",
        "kernels/_impl.py": """
            import importlib

            def triton_kernel(module, name):
                return getattr(importlib.import_module(f"{__package__}.triton.{module}"), name)
        """,
        "kernels/norm.py": """
            from ._impl import triton_kernel

            def norm(x, impl):
                return triton_kernel("norm", "norm_triton")(x) if impl == "triton" else x
        """,
        "kernels/triton/__init__.py": "",
        "kernels/triton/_common.py": "",
        "kernels/triton/norm.py": "from ._common import *\n",
        "kernels/triton/other.py": "",
    })
    sources = {"model.py": "from fgc_runtime.kernels import norm\n"}
    plain = ["__init__.py", "kernels/__init__.py", "kernels/_impl.py", "kernels/norm.py"]
    assert closure(sources, rt, triton=False) == plain
    assert closure(sources, rt, triton=True) == sorted(
        plain + ["kernels/triton/__init__.py", "kernels/triton/_common.py", "kernels/triton/norm.py"]
    )
    torch_only = {"norm": {"impl": "torch", "reason": "auto"}, "cross_entropy": {"impl": "chunked", "reason": "x"}}
    assert not picks_triton(torch_only)
    assert picks_triton(torch_only | {"rope": {"impl": "mixed", "reason": "x"}})
    assert picks_triton(torch_only | {"rope": {"impl": "triton", "reason": "x"}})


def test_every_runtime_module_is_reachable_and_every_import_by_name_has_a_rule():
    """Importing every module of the real runtime reaches all of it (with Triton), and the
    closure knows every import by name the runtime makes (it raises for one it does not)."""
    every = sorted(p.relative_to(RUNTIME).as_posix() for p in RUNTIME.rglob("*.py"))
    modules = [".".join(["fgc_runtime", *Path(rel).with_suffix("").parts]).removesuffix(".__init__") for rel in every]
    source = "".join(f"import {m}\n" for m in modules)
    assert closure({"train.py": source}, RUNTIME, triton=True) == every
    source = "".join(f"import {m}\n" for m in modules if not m.startswith("fgc_runtime.kernels.triton"))
    without = closure({"train.py": source}, RUNTIME, triton=False)
    assert without == [rel for rel in every if not rel.startswith("kernels/triton/")]


def _imports(tree: ast.AST) -> list[str]:
    """Each import statement of TREE, at any depth, with its line: the closure's view of it."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted(f"{n.lineno}: {ast.unparse(n)}" for n in nodes)


def test_the_import_lines_of_every_runtime_module_are_its_import_statements():
    """The closure reads a runtime module's imports from its import lines alone (no loader call):
    on every module of the runtime, the same statements at the same lines as a parse of the whole
    text."""
    from fgc.codegen.closure import _import_statements

    checked = 0
    for path in sorted(RUNTIME.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert _imports(_import_statements(text)) == _imports(ast.parse(text)), path
        checked += "import" in text
    assert checked > 20


def test_the_import_lines_take_continuations_and_leave_prose():
    from fgc.codegen.closure import _import_statements

    text = textwrap.dedent('''\
        """Docs.

        import this and that, from the shards
        from the data import nothing
        """
        from .a import (  # the names (two)
            b,
            c,
        )
        import os, \\
            sys

        CODE = \'\'\'
        from .fgc_model import build_model  # code in a string: no import of this module
        \'\'\'  # """ in a comment


        def f():
            if True:
                from ..x import y
    ''')
    assert _imports(_import_statements(text)) == _imports(ast.parse(text)) == [
        "10: import os, sys",
        "20: from ..x import y",
        "6: from .a import b, c",
    ]


# -- packages ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """Packages of the tiny example, by trainer (and one running the Triton kernels)."""
    tmp = tmp_path_factory.mktemp("packages")
    builds = {
        "basic": ["-D", "trainer_type=basic"],
        "ddp": ["-D", "trainer_type=ddp"],
        "pipeline": ["-D", "trainer_type=pipeline"],
        "diloco": ["-D", "trainer_type=diloco"],
        "triton": ["-D", "trainer_type=basic", "-D", "kernel_impl=triton"],
    }
    out = {}
    for name, defines in builds.items():
        out[name] = tmp / name
        run_fgc("build", EXAMPLE, "-o", out[name], *SMALL, *defines, check=True)
    return out


def runtime_of(pkg: Path) -> list[str]:
    """The vendored runtime files of PKG, relative to its fgc_runtime/."""
    root = pkg / "fgc_runtime"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))


def test_a_package_vendors_only_what_its_trainer_runs(packages):
    full = sorted(p.relative_to(RUNTIME).as_posix() for p in RUNTIME.rglob("*.py"))
    for name in ("basic", "ddp"):
        have = runtime_of(packages[name])
        for rel in ["pipeline.py", "diloco.py", *TRITON]:
            assert rel not in have, (name, rel)
        # what every trainer runs: errors, data, checkpoints, the kernels its model calls; and
        # quantize, which train.py imports for --export-hf --quantize
        for rel in ["__init__.py", "errors.py", "data.py", "checkpoint.py", "hf.py", "quantize.py",
                    "kernels/__init__.py", "kernels/rms_norm.py", "kernels/_impl.py"]:
            assert rel in have, (name, rel)
        assert len(have) < len(full)
    assert "pipeline.py" in runtime_of(packages["pipeline"])
    assert "diloco.py" not in runtime_of(packages["pipeline"])
    assert "diloco.py" in runtime_of(packages["diloco"])
    assert "pipeline.py" not in runtime_of(packages["diloco"])
    triton = runtime_of(packages["triton"])
    assert set(TRITON) <= set(triton)
    assert sorted(set(triton) - set(TRITON)) == runtime_of(packages["basic"])
    # verbatim copies, each listed in the manifest with its hash
    for pkg in packages.values():
        outputs = json.loads((pkg / "manifest.json").read_text())["outputs"]
        files = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file())
        assert sorted(outputs) == [f for f in files if f != "manifest.json"]
        for rel in runtime_of(pkg):
            data = (pkg / "fgc_runtime" / rel).read_bytes()
            assert data == (RUNTIME / rel).read_bytes(), rel
            assert outputs[f"fgc_runtime/{rel}"] == hashlib.sha256(data).hexdigest(), rel


def runtime_imports(path: Path, module: str | None):
    """(base module, names, by name) of each fgc_runtime import in PATH (MODULE: its dotted
    name, None for train.py and model.py); ``names`` is empty for ``import M``; ``by name`` is
    True for a ``triton_kernel("M", ...)`` call, which imports ``fgc_runtime.kernels.triton.M``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fgc_runtime":
                    yield alias.name, [], False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert module is not None, (path, "a relative import in a generated file")
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "fgc_runtime":
                yield base, [a.name for a in node.names], False
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "triton_kernel":
            yield f"fgc_runtime.kernels.triton.{node.args[0].value}", [], True


def module_file(root: Path, module: str) -> Path | None:
    """The file of MODULE (dotted, from fgc_runtime) under ROOT (a directory holding fgc_runtime/)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_every_vendored_import_resolves_inside_the_package(packages):
    """Each fgc_runtime import of train.py, model.py and the vendored modules (those inside
    functions too) names a module the package holds; a name imported from a package that is a
    module of the runtime is there too. The Triton kernels' imports by name count where the
    package runs them."""
    for name, pkg in packages.items():
        runs_triton = name == "triton"
        files = [(pkg / "train.py", None), (pkg / "model.py", None)]
        for path in sorted((pkg / "fgc_runtime").rglob("*.py")):
            parts = path.relative_to(pkg).with_suffix("").parts
            files.append((path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)))
        for path, module in files:
            for base, names, by_name in runtime_imports(path, module):
                if by_name and not runs_triton:
                    continue  # a triton_kernel() call: never made by a package whose kernels run torch
                chain = base.split(".")
                for n in range(1, len(chain) + 1):
                    assert module_file(pkg, ".".join(chain[:n])) is not None, (name, path, base)
                for imported in names:
                    if module_file_in_runtime(f"{base}.{imported}"):
                        assert module_file(pkg, f"{base}.{imported}") is not None, (name, path, base, imported)


def module_file_in_runtime(module: str) -> bool:
    """Whether MODULE (dotted, from fgc_runtime) is a module of the repository's runtime/."""
    parts = module.split(".")[1:]
    base = RUNTIME.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


# -- the packages run -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_package_trains_dry_runs_and_exports_without_the_full_runtime(packages, tmp_path):
    """The basic package trains 2 steps and exports its checkpoint to Hugging Face; the ddp one
    dry-runs; the one on the Triton kernels trains a step (in Triton's interpreter): each with
    nothing of fgc (nor the repository's runtime) importable."""
    from test_codegen import BLOCKED, site_without

    env = dict(os.environ, PYTHONPATH=str(site_without(tmp_path, BLOCKED)))

    def run(pkg: Path, *args, **extra_env) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-S", str(pkg / "train.py"), *map(str, args)],
                              cwd=tmp_path, env=env | extra_env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(packages["basic"], "--output-dir", tmp_path / "run", "--max-steps", "2")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 2
    run(packages["basic"], "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "hf").iterdir())
    proc = run(packages["ddp"], "--output-dir", tmp_path / "dry", "--dry-run")
    assert "plan:\n  trainer_type" in proc.stdout
    # the kernels' Triton modules, imported by name on first use, are in the package
    run(packages["triton"], "--output-dir", tmp_path / "triton", "--max-steps", "1", "--device", "cpu",
        TRITON_INTERPRET="1")
    assert (tmp_path / "triton" / "metrics.jsonl").is_file()
