"""Shared helpers for fgc's tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# fgc_runtime's Triton kernels run on CPU tensors in Triton's interpreter, which reads this
# variable when triton is first imported (so before any test imports it). On a machine with a
# GPU, TRITON_INTERPRET=0 runs the kernel tests on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs in two processes (pytest-xdist, `-n 2`). torchrun's static rendezvous listens on
# --master-port, 29500 unless set (`PET_MASTER_PORT` is its environment form), so two workers'
# launches at once would meet on one port: each worker takes its own, which every torchrun the
# tests start (directly or through a package's launch.sh) inherits.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    os.environ.setdefault("PET_MASTER_PORT", str(29500 + 7 * (int(_worker[2:]) + 1)))

# fgc's on-disk cache (fgc/cache.py) of the tests' builds: one directory for the whole run, apart
# from the user's own ~/.cache/fgc (its entries are written atomically, so workers share it)
os.environ.setdefault("FGC_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fgc-test-cache-{os.getuid()}"))

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """The module benchmarks/NAME.py, imported as NAME with benchmarks/ on sys.path for the
    import only (the scripts import their helpers, _loops and _table, by name)."""
    import importlib.util

    script = REPO / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if str(script.parent) in sys.path:
            sys.path.remove(str(script.parent))
    return module
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


SMALL_CORPUS = "\n\n".join(f"line {i}: pack my box with five dozen liquor jugs." for i in range(200))


def small_config(tmp_path: Path, meta: str = "", extra: str = "") -> Path:
    """`TMP_PATH/cfg.yaml`: a small child of lm/train.yaml over its own corpus, with META added to
    its `[config_metadata]` (after the size defaults, which `-D` can still set) and EXTRA after
    its `[data]` block (e.g. a block that overrides the library's)."""
    (tmp_path / "corpus.txt").write_text(SMALL_CORPUS)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        '-- extends "lm/train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.hidden_size = hidden_size | default(32)\n"
        "-- set ns.num_hidden_layers = num_hidden_layers | default(2)\n"
        "-- set ns.seq_len = seq_len | default(32)\n"
        "-- set ns.batch_size = batch_size | default(4)\n"
        "-- set ns.max_steps = max_steps | default(3)\n"
        f"{meta}"
        "[data]\n"
        ".data: &data !singleton:fgc.settings:DataSettings@data\n"
        "    text_files: [corpus.txt]\n"
        f"{extra}"
    )
    return path


def line_of(path: Path, text: str) -> int:
    """The number of the first line of PATH that contains TEXT."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def tiny_causal_lm(vocab_size: int):
    """A CausalLM of the component library's parts (2 layers of hidden 16, 2 heads, RMSNorm,
    SwiGLU, rotary positions up to 16), built under the caller's seed."""
    import functools

    from fgc.components.attention import CausalSelfAttention
    from fgc.components.causal_lm import CausalLM
    from fgc.components.layers import PreNormDecoderLayer
    from fgc.components.mlp import SwiGLUMLP
    from fgc.components.norm import RMSNorm
    from fgc.components.rotary import RotaryEmbedding

    return CausalLM(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2,
        layer_factory=functools.partial(
            PreNormDecoderLayer,
            attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=2, num_key_value_heads=2),
            mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=32),
            norm_factory=RMSNorm,
        ),
        norm_factory=RMSNorm,
        positions=RotaryEmbedding(head_dim=8, max_position_embeddings=16),
    )
