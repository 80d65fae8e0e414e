"""fgc's on-disk cache (fgc/cache.py): a build that reads results back makes the same package
as one that computes everything, and a damaged or unusable cache only costs time."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, REPO, run_fgc
from fgc import cache


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(root: Path) -> list[Path]:
    """The cache's entries (not the stamp of its last pruning)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != cache.STAMP)


def test_put_then_get_and_every_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("FGC_CACHE_DIR", str(tmp_path / "c"))
    k = cache.key("black", "26.1", "x = 1\n")
    assert cache.get("black", k) is None
    cache.put("black", k, "x = 1\n")
    assert cache.get("black", k) == "x = 1\n"
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700  # private: its text becomes code
    # the parts are length-prefixed: moving text between them changes the key
    assert cache.key("ab", "c") != cache.key("a", "bc")
    # a damaged entry (its content no longer matches the hash stored with it) is a miss
    (entry,) = _entries(tmp_path / "c")
    entry.write_bytes(entry.read_bytes().replace(b"x = 1", b"x = 2"))
    assert cache.get("black", k) is None
    entry.write_bytes(b"no newline, no hash")
    assert cache.get("black", k) is None


def test_off_writes_nothing_and_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("FGC_CACHE_DIR", "off")
    assert cache.cache_dir() is None
    cache.put("black", cache.key("y"), "y\n")
    assert cache.get("black", cache.key("y")) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    monkeypatch.setenv("FGC_CACHE_DIR", str(blocker / "cache"))
    cache.put("black", cache.key("y"), "y\n")  # cannot make the directory: no error
    assert cache.get("black", cache.key("y")) is None
    assert blocker.read_text() == "not a directory\n"
    monkeypatch.delenv("FGC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "fgc"


def _aged(path: Path, seconds_ago: float, now: float) -> None:
    import os

    os.utime(path, (now - seconds_ago, now - seconds_ago))


def test_prune_removes_the_least_recently_used_entries_and_nothing_else(tmp_path, monkeypatch):
    import time

    root = tmp_path / "c"
    monkeypatch.setenv("FGC_CACHE_DIR", str(root))
    now = time.time()
    keys = [cache.key("entry", str(i)) for i in range(8)]
    for i, k in enumerate(keys):
        cache.put("black", k, "x" * 1000)  # 1,065 bytes each, with the hash line
        _aged(root / "black" / k[:2] / k, 1000 - i, now)  # the first is the least recent
    assert cache.get("black", keys[0]) is not None  # a read marks it used: now the most recent
    # what is not fgc's: never removed, whatever its name or age
    foreign = [root / "notes.txt", root / "black" / "my-file", root / "other" / keys[1][:2] / keys[1],
               root / "black" / "zz" / keys[2], root / "black" / keys[3][:2] / (keys[3][:63] + "g")]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y" * 5000)
        _aged(path, 10**6, now)
    leftover = root / "vendor" / "ab" / ".tmp-killed"
    fresh_tmp = root / "vendor" / "ab" / ".tmp-writing"
    for path, age in ((leftover, 2 * 86400), (fresh_tmp, 10)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"t" * 10)
        _aged(path, age, now)
    size = (root / "black" / keys[0][:2] / keys[0]).stat().st_size
    # within the limit: only the killed build's temporary file goes
    assert cache.prune(root, limit=8 * size + 100, now=now) == 10
    assert not leftover.exists() and fresh_tmp.exists()
    # over it: the least recently used entries go until three quarters of the limit are left
    assert cache.prune(root, limit=6 * size, now=now) == 4 * size
    kept = [k for k in keys if (root / "black" / k[:2] / k).exists()]
    assert kept == [keys[0], keys[5], keys[6], keys[7]]
    assert all(path.read_bytes() == b"y" * 5000 for path in foreign) and fresh_tmp.exists()


def test_maybe_prune_prunes_at_most_once_an_hour_to_the_configured_size(tmp_path, monkeypatch):
    import time

    root = tmp_path / "c"
    monkeypatch.setenv("FGC_CACHE_DIR", str(root))
    cache.maybe_prune()  # no cache yet: nothing, not even the stamp
    assert not root.exists()
    monkeypatch.setenv("FGC_CACHE_MAX_MB", "0.001")  # 1,048 bytes: one entry is too many
    now = time.time()
    k = cache.key("one")
    cache.put("black", k, "x" * 2000)
    cache.maybe_prune(now=now)
    assert not (root / "black" / k[:2] / k).exists() and (root / cache.STAMP).exists()
    cache.put("black", k, "x" * 2000)
    cache.maybe_prune(now=now + 60)  # pruned a minute ago: not again
    assert cache.get("black", k) is not None
    cache.maybe_prune(now=now + cache.PRUNE_EVERY_S + 1)
    assert cache.get("black", k) is None
    monkeypatch.setenv("FGC_CACHE_MAX_MB", "lots")  # not a number: the default
    assert cache.max_bytes() == cache.DEFAULT_MAX_MB * 2**20


def test_a_build_keeps_the_cache_to_its_size(tmp_path, monkeypatch):
    from fgc.cli import main

    root = tmp_path / "c"
    monkeypatch.setenv("FGC_CACHE_DIR", str(root))
    monkeypatch.setenv("FGC_CACHE_MAX_MB", "0.05")  # 52 kB: less than one build's results
    result = CliRunner().invoke(main, ["build", str(EXAMPLE), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "train.py").is_file() and (root / cache.STAMP).is_file()
    entries = _entries(root)
    assert entries and sum(p.stat().st_size for p in entries) <= 0.05 * 2**20 * 3 / 4


def test_a_build_from_the_cache_is_byte_identical_and_survives_damaged_entries(tmp_path):
    cold = run_fgc("build", str(EXAMPLE), "-o", str(tmp_path / "cold"), env={"FGC_CACHE_DIR": "off"})
    assert cold.returncode == 0, cold.stderr
    env = {"FGC_CACHE_DIR": str(tmp_path / "cache")}
    first = run_fgc("build", str(EXAMPLE), "-o", str(tmp_path / "first"), env=env)
    assert first.returncode == 0, first.stderr
    kinds = {p.parent.parent.name for p in _entries(tmp_path / "cache")}
    assert kinds == {"black", "vendor", "closure-edges"}
    warm = run_fgc("build", str(EXAMPLE), "-o", str(tmp_path / "warm"), env=env)
    assert warm.returncode == 0, warm.stderr
    expected = _files(tmp_path / "cold")
    assert _files(tmp_path / "first") == expected
    assert _files(tmp_path / "warm") == expected
    # damage every entry: each is a miss, computed again, and written back whole
    entries = _entries(tmp_path / "cache")
    for entry in entries:
        data = entry.read_bytes()
        entry.write_bytes(data[:-2] + b"#\n")
    again = run_fgc("build", str(EXAMPLE), "-o", str(tmp_path / "again"), env=env)
    assert again.returncode == 0, again.stderr
    assert _files(tmp_path / "again") == expected
    for entry in entries:
        digest, _, body = entry.read_bytes().partition(b"\n")
        assert cache.hashlib.sha256(body).hexdigest().encode() == digest, entry


def test_a_warm_build_formats_vendors_and_parses_nothing(tmp_path, monkeypatch):
    import black

    import fgc.codegen.closure as closure
    import fgc.codegen.package as package
    import fgc.codegen.vendor as vendor
    from fgc.cli import main

    monkeypatch.setenv("FGC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    # the process's own memory of sources met before, cleared before the first build too: a source
    # an earlier test formatted would be found there and never written to this cache
    package.format_python.cache_clear()
    assert CliRunner().invoke(main, ["build", str(EXAMPLE), "-o", str(out)]).exit_code == 0
    package.format_python.cache_clear()
    calls: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            calls.append(what)
            raise AssertionError(what)

        return call

    monkeypatch.setattr(black, "format_str", refuse("black"))
    monkeypatch.setattr(vendor.Vendorer, "collect", refuse("vendoring"))
    monkeypatch.setattr(closure, "_edges", refuse("closure"))
    before = _files(out)
    result = CliRunner().invoke(main, ["build", str(EXAMPLE), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert calls == []
    assert _files(tmp_path / "again") == before


def test_the_console_script_exits_with_the_commands_status_and_all_its_output(tmp_path):
    """`fgc` ends with os._exit once the command is over: its output must all be there."""
    from fgc.cli import main

    in_process = CliRunner().invoke(main, ["pp", str(EXAMPLE)])
    assert in_process.exit_code == 0
    script = run_fgc("pp", str(EXAMPLE), cwd=tmp_path)
    assert script.returncode == 0
    assert script.stdout == in_process.stdout and len(script.stdout) > 1000
    failed = run_fgc("build", "missing.yaml", "-o", "x", cwd=tmp_path)
    assert failed.returncode == 2
    assert "missing.yaml" in failed.stderr and "error:" in failed.stderr
    assert not (tmp_path / "x").exists()


# user code written at 120 columns, with comments, a decorator and a module-level constant, so
# that black has work to do on each kind of copied definition
USER_CODE = '''import dataclasses
import torch
from torch import nn

SCALE = {"up": 1.0, "down": 1.0, "a_name_long_enough": 2.0, "to_make_black_split_this_dict": 3.0}


# a comment of its own, apart from the function

def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh") * SCALE["up"] * SCALE["down"] * SCALE["a_name_long_enough"]


@dataclasses.dataclass
class Widths:
    hidden: int
    inner: int


# the MLP
class GeluMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        w = Widths(hidden_size, intermediate_size)
        self.up_proj = nn.Linear(w.hidden, w.inner, bias=False); self.down_proj = nn.Linear(w.inner, w.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(_gelu_tanh(self.up_proj(x)))


def linear_decay(optimizer, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps), last_epoch=-1)
'''

CONFIGS = {
    "example": [str(EXAMPLE)],
    "relu2-mlp (user code)": [str(REPO / "examples" / "variants" / "relu2_mlp.yaml")],
    "pipeline": [str(EXAMPLE), "-D", "trainer_type=pipeline"],
    **{f"family {name}": [str(EXAMPLE), "-D", f"family={name}"] for name in ("gemma", "gpt2", "mixtral", "olmo2", "phi3", "granite", "gpt_neox", "qwen3_moe")},
}


def _check_against_whole_black(monkeypatch) -> list[int]:
    """Make every format_module call also format the whole module with black, and compare."""
    import black

    import fgc.codegen.package as package

    real = package.format_module
    checked: list[int] = []

    def checking(render, definitions, verbatim=frozenset()):
        out = real(render, definitions, verbatim)
        whole = black.format_str(render(definitions), mode=black.Mode(target_versions={black.TargetVersion.PY310}))
        assert out == whole
        checked.append(len(definitions))
        return out

    monkeypatch.setattr(package, "format_module", checking)
    return checked


@pytest.mark.parametrize("args", CONFIGS.values(), ids=CONFIGS.keys())
def test_definitions_formatted_apart_make_what_black_makes_of_the_whole_file(tmp_path, monkeypatch, args):
    from fgc.cli import main

    monkeypatch.setenv("FGC_CACHE_DIR", str(tmp_path / "cache"))
    checked = _check_against_whole_black(monkeypatch)
    result = CliRunner().invoke(main, ["build", *args, "-o", str(tmp_path / "out"), "--no-smoke"])
    assert result.exit_code == 0, result.output
    assert len(checked) == 2 and checked[0] > 0  # model.py (with its library code) and train.py


def test_user_code_formatted_apart_makes_what_black_makes_of_the_whole_file(tmp_path, monkeypatch):
    from fgc.cli import main

    (tmp_path / "my_layers.py").write_text(USER_CODE)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        '-- extends "lm/train.yaml"\n'
        "[mlp]\n.mlp: &mlp !partial:.my_layers:GeluMLP@mlp_factory\n    intermediate_size: 64\n"
        "[lr_scheduler]\nlr_scheduler: !partial:.my_layers:linear_decay\n    total_steps: 10\n"
        "[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n"
        f"    text_files: [{EXAMPLE.parent / 'corpus.txt'}]\n"
    )
    monkeypatch.setenv("FGC_CACHE_DIR", str(tmp_path / "cache"))
    checked = _check_against_whole_black(monkeypatch)
    result = CliRunner().invoke(main, ["build", str(cfg), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert checked[0] >= 4 and checked[1] == 1  # GeluMLP, Widths, _gelu_tanh, SCALE...; linear_decay
    model = (tmp_path / "out" / "model.py").read_text()
    assert "# a comment of its own, apart from the function\n\n\ndef _gelu_tanh(x):" in model
    assert "# the MLP\nclass GeluMLP(nn.Module):" in model


def test_the_library_code_a_model_copies_is_black_formatted():
    """Library definitions are copied into model.py as they are (VendoredCode.verbatim)."""
    import black

    mode = black.Mode(target_versions={black.TargetVersion.PY310})
    root = REPO / "fgc"
    files = sorted((root / "components").glob("*.py")) + sorted((root / "families").rglob("*.py"))
    assert len(files) > 20
    unformatted = [str(f.relative_to(REPO)) for f in files if black.format_str(f.read_text(), mode=mode) != f.read_text()]
    assert unformatted == [], "run: black -l 88 -t py310 fgc/components fgc/families"


def test_format_module_formats_the_whole_module_when_black_moves_a_stub(monkeypatch):
    """A skeleton where black does not keep a definition's stub line as it is (here a comment
    after it, which black keeps on the stub's line, so the line is no stub any more) falls back to
    black over the whole module: the result is still black's, and the fallback is taken."""
    import black

    import fgc.codegen.package as package

    definitions = [("lib.py", "f", "def f(x):\n    return x+1\n"), ("lib.py", "g", "def g():\n  return 2\n")]

    def render(defs):
        return "import os\n" + "".join(f"\n\n{source.rstrip()}  # from {file}\n" for file, _, source in defs)

    whole_calls = []
    real = package.format_python

    def counting(source):
        if "_fgc_definition_" not in source and "import os" in source:
            whole_calls.append(source)
        return real(source)

    monkeypatch.setattr(package, "format_python", counting)
    out = package.format_module(render, definitions)
    assert out == black.format_str(render(definitions), mode=black.Mode(target_versions={black.TargetVersion.PY310}))
    assert "    return x + 1  # from lib.py\n" in out
    assert whole_calls == [render(definitions)]  # the fallback formatted the whole module, once
