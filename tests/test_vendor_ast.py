"""Vendoring reads the library's modules with Python's ast (fast) and the user's with libcst:
for every library module the two readings must give the same definitions, text, dependencies
and import lines, and the ast reading must decline (fall back to libcst) where its line-based
split would differ."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from fgc.codegen import vendor

ROOT = Path(vendor.__file__).resolve().parent.parent  # the fgc package
LIBRARY = sorted(
    [p for p in (ROOT / "components").glob("*.py")] + [p for p in (ROOT / "families").rglob("parts.py")]
)


def _module_name(path: Path) -> str:
    return ".".join(("fgc",) + path.relative_to(ROOT).with_suffix("").parts)


def _summary(info: dict) -> dict:
    return {
        name: (d.source(), sorted(d.deps), sorted(d.imports), sorted(d.import_modules))
        for name, d in info["defs"].items()
    }


def test_the_library_has_modules_to_compare():
    names = {_module_name(p) for p in LIBRARY}
    assert {"fgc.components.attention", "fgc.components.causal_lm", "fgc.families.gemma.parts"} <= names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_ast_reading_equals_libcst_reading(path):
    module = _module_name(path)
    importlib.import_module(module)
    fast = vendor._library_module(module, path, path.name)
    slow = vendor.Vendorer()._cst_module(module, path, path.name, False)
    assert fast is not None, f"{module}: the ast reading declined a library module"
    assert _summary(fast) == _summary(slow)


def _both(tmp_path: Path, source: str) -> tuple[dict | None, dict]:
    path = tmp_path / "mod.py"
    path.write_text(source)
    return vendor._library_module("mod", path, "mod.py"), vendor.Vendorer()._cst_module("mod", path, "mod.py", False)


def test_comments_around_definitions_go_where_libcst_puts_them(tmp_path):
    source = (
        '"""doc"""\n'
        "import math\n\n"
        "# leads f\n\n"
        "# also leads f\n"
        "@staticmethod\n"
        "def f(a):\n"
        "    return math.sqrt(a)\n"
        "    # f's footer\n\n"
        "# f's footer too: an indented comment follows\n"
        "    # the last of f's footer\n\n"
        "class C:  # header comment\n"
        "    y = f(1)\n\n"
        "  # shallower than C's block: leads X\n"
        "X: int = 1  # tail\n"
        "Y = Z = C\n"
        "# the module's footer\n"
    )
    fast, slow = _both(tmp_path, source)
    assert fast is not None
    assert _summary(fast) == _summary(slow)
    assert fast["defs"]["f"].source().startswith("# leads f\n\n# also leads f\n@staticmethod")
    assert fast["defs"]["f"].source().endswith("    # the last of f's footer")
    assert fast["defs"]["X"].source() == "  # shallower than C's block: leads X\nX: int = 1  # tail"
    assert fast["defs"]["C"].deps == {("mod", "f")}
    assert fast["defs"]["f"].imports == {"import math"}
    assert ("mod", "C") in fast["defs"]["Z"].deps


def test_names_in_keywords_attributes_and_fstrings_count_as_uses(tmp_path):
    source = (
        '"""doc"""\n'
        "from os import path as p, sep\n"
        "import collections.abc\n\n"
        "def helper():\n"
        "    return 1\n\n"
        "def g(x, *, helper2=None):\n"
        '    return f"{sep}{p.join(x)}", collections.abc, dict(helper=helper)\n'
    )
    fast, slow = _both(tmp_path, source)
    assert _summary(fast) == _summary(slow)
    g = fast["defs"]["g"]
    assert g.deps == {("mod", "helper")}
    assert g.imports == {"from os import path as p", "from os import sep", "import collections.abc"}


@pytest.mark.parametrize(
    "source",
    [
        '"""doc"""\nA = 1; B = 2\n',  # two statements on a line
        '"""doc"""\nclass C: pass\n',  # a block on its header's line
        "# a comment before the first statement\nA = 1\n",  # libcst's module header
    ],
    ids=["semicolon", "one-line-block", "header"],
)
def test_the_ast_reading_declines_what_it_cannot_split_by_line(tmp_path, source):
    fast, slow = _both(tmp_path, source)
    assert fast is None
    assert slow["defs"]  # libcst reads it: vendoring falls back to it


def test_a_relative_import_in_the_library_is_an_error(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text('"""doc"""\nfrom .x import y\n')
    with pytest.raises(vendor.VendorError, match=r"a relative import \(from \.x import y\) cannot be vendored"):
        vendor._library_module("mod", path, "mod.py")
