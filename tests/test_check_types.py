"""check-types: scalar arguments against parameter annotations, at the value's line."""

from __future__ import annotations

import enum
import sys
import textwrap
import typing

import pytest

from fgc.errors import FgcError
from fgc.inspect import load_for_code
from fgc_lowering.types import describe, value_ok

HELPERS = '''
import enum
from typing import Literal, Optional, Sequence


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def make(n: int, ratio: float, name: str, flag: bool, mode: Literal["a", "b"], color: Color,
         dims: Sequence[int], pair: tuple[int, str], maybe: Optional[int] = None, **rest):
    return locals()


def loose(x, y: "NotARealType" = 1):
    return x
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "typed_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("typed_helpers", None)


def errors_of(project, text):
    cfg = project / "cfg.yaml"
    cfg.write_text(textwrap.dedent(text).lstrip("\n"))
    try:
        load_for_code(cfg)
    except FgcError as exc:
        return [(d.loc.line, d.message) for d in exc.diagnostics]
    return []


GOOD = """
x: !singleton:typed_helpers:make
    n: 3
    ratio: 2
    name: hi
    flag: true
    mode: b
    color: red
    dims: [1, 2]
    pair: !tuple [1, "a"]
    maybe: null
    anything: [1, {a: 2}]
"""


def test_well_typed_config_passes(project):
    assert errors_of(project, GOOD) == []


@pytest.mark.parametrize(
    "key, bad, message",
    [
        ("n", "3.5", "make.n must be int, got 3.5"),
        ("n", "true", "make.n must be int, got True"),
        ("ratio", "fast", "make.ratio must be float, got 'fast'"),
        ("name", "12", "make.name must be str, got 12"),
        ("flag", "1", "make.flag must be bool, got 1"),
        ("mode", "c", "make.mode must be one of 'a', 'b', got 'c'"),
        ("color", "green", "make.color must be one of 'red', 'blue' (Color), got 'green'"),
        ("dims", "[1, x]", "make.dims must be Sequence[int], got [1, 'x']"),
        ("pair", "[1, 2]", "make.pair must be tuple[int, str], got [1, 2]"),
        ("maybe", "nope", "make.maybe must be int or null, got 'nope'"),
    ],
)
def test_each_mismatch_is_reported_at_its_line(project, key, bad, message):
    lines = GOOD.lstrip("\n").splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
    lines[index] = f"    {key}: {bad}"
    assert errors_of(project, "\n".join(lines) + "\n") == [(index + 1, message)]


def test_positional_and_unresolvable_annotations(project):
    assert errors_of(project, "x: !singleton:typed_helpers:loose [1, whatever]\n") == []
    assert errors_of(project, "x: !partial:typed_helpers:make [1.5]\n") == [(1, "make.n must be int, got 1.5")]


def test_torch_signatures_are_checked(project):
    errors = errors_of(project, "opt: !partial:torch.optim:AdamW\n    lr: fast\n    amsgrad: 1\n")
    assert [line for line, _ in errors] == [2, 3]
    assert "AdamW.lr must be float" in errors[0][1]


def test_every_error_reported_together(project):
    errors = errors_of(project, "a: !singleton:torch.nn:Linear [x, 2]\nb: !singleton:torch.nn:Linear [1, 2.5]\n")
    assert [line for line, _ in errors] == [1, 2]


def test_value_ok_unit():
    class Mode(enum.Enum):
        A = 1

    assert value_ok(1, float) and not value_ok(True, float)
    assert value_ok(1, Mode) and value_ok("A", Mode) and not value_ok("B", Mode)
    assert value_ok([1, 2], list[int]) and not value_ok([1, "x"], list[int])
    assert value_ok(None, typing.Optional[str]) and not value_ok(None, str)
    assert value_ok("anything", typing.Any)
    assert describe(typing.Optional[int]) == "int or null"
