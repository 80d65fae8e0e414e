"""Shared helpers for fgc's tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_llama" / "train.yaml"


def run_fgc(*args, cwd=None, env=None, check=False) -> subprocess.CompletedProcess:
    """Run ``python -m fgc ARGS`` and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "fgc", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fgc {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ROOT by relative path (skipping Python caches)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def example():
    return EXAMPLE
