"""README.md's commands are the ones that CI runs (issue #19).

CI (`.ci/run`) runs on a clean clone on a fresh machine: it installs with README's set-up command
and runs README's test command, so a README whose set-up or test command drifted from what works
would fail CI. The main job's commands are checked by tests/test_doc_snippets.py (the
getting-started page runs them and compares their output).
"""

from __future__ import annotations

import re

from conftest import REPO


def _readme_block_after(label: str) -> list[str]:
    """The indented command lines of the code block that follows the paragraph starting LABEL."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    i = start + 1
    while i < len(lines) and not lines[i].startswith("    "):
        i += 1
    block = []
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        if lines[i].strip():
            block.append(lines[i].strip())
        i += 1
    return block


def _ci_commands() -> list[str]:
    """The commands `.ci/run` runs, without comments, `set`/`cd` lines and the interpreter prefix."""
    out = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.split()[0] in ("set", "cd"):
            continue
        out.append(re.sub(r"^python -m (pip|pytest)\b", r"\1", line))
    return out


def test_ci_installs_with_the_readmes_set_up_and_runs_its_test_command():
    setup = _readme_block_after("**Set up**")
    tests = _readme_block_after("**Tests**")
    assert setup == ['pip install torch==2.13.0 -e ".[test]"']
    assert tests == ["python -m pytest -n 2"]  # two worker processes (pytest-xdist)
    ci = _ci_commands()
    # CI pins torch in a first command of its own (so pip never resolves a CUDA build), then
    # installs the rest as README says: the same two requirements, in the same order
    installs = " ".join(c for c in ci if c.startswith("pip install")).split()
    assert [w for w in installs if w not in ("pip", "install")] == ["torch==2.13.0", '-e', '".[test]"']
    runs = [c for c in ci if c.startswith("pytest")]
    assert len(runs) == 1 and runs[0].split()[:1] == ["pytest"]
    words = [w for w in runs[0].split() if w != "-q"]
    assert words == tests[0].split()[2:], "CI must run the README's test command (only quieter)"
