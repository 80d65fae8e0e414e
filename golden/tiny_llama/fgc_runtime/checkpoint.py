"""Atomic, complete checkpoints.

Layout under the output dir::

    checkpoints/
      step-00000100/
        model.pt            model state dict                      (rank 0)
        optimizer.pt        optimizer state dict                  (rank 0)
        trainer_state.pt    scheduler state, step, tokens seen,   (rank 0)
                            data position, config hash, ...
        rng-rank0.pt ...    Python / torch CPU / CUDA RNG states  (one per rank, by that rank)
        state-rank0.pt ...  a rank's own state, when ranks differ  (one per rank, by that rank;
                            the DiLoCo trainer's local model and inner optimizer)
        manifest.json       written last: files, step, config_hash, world_size
      latest                a text file naming the newest complete checkpoint, e.g. "step-00000100"

A checkpoint is complete iff its ``manifest.json`` exists. It is written into
``checkpoints/.tmp-step-00000100``, fsynced, then renamed into place, so a crash never leaves a
``step-*`` directory half written; ``latest`` is then replaced atomically. With several ranks the
output dir must be on a filesystem every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .errors import RunError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``: ``step-00000100``."""
    return f"step-{step:08d}"


def rng_state() -> dict:
    """This process's RNG states: Python ``random``, torch CPU and, when present, every CUDA device."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`rng_state` (CUDA ones only when CUDA is present)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    # makes renames and new entries durable; not every OS can open a directory
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete ``step-*`` checkpoints under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and _is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def save_checkpoint(
    output_dir,
    *,
    step: int,
    model_state,
    optimizer_state,
    trainer_state: dict,
    rank: int = 0,
    world_size: int = 1,
    keep_last_n: int | None = None,
    barrier: Callable[[], None] | None = None,
    rank_state=None,
) -> Path:
    """Write the checkpoint of ``step`` and return its directory; every rank calls this.

    Rank 0 writes the model, optimizer and trainer state (other ranks may pass None for them);
    every rank writes its RNG states and, when ``rank_state`` is given (by every rank), that
    object as ``state-rank{rank}.pt``. ``barrier`` (a no-op when None) separates the phases so the
    manifest is written only after every rank has written. Then rank 0 renames the directory into
    place, updates ``latest``, removes stale ``.tmp-*`` directories and, with ``keep_last_n``
    (None or 0: keep all), deletes older complete checkpoints, never the newest complete one.
    """
    sync = barrier or (lambda: None)
    root = Path(output_dir) / CHECKPOINTS
    name = step_dir_name(step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash while saving this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save(model_state, tmp / "model.pt")
        _save(optimizer_state, tmp / "optimizer.pt")
        _save(trainer_state, tmp / "trainer_state.pt")
    sync()  # the tmp dir exists for every rank
    _save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank_state is not None:
        _save(rank_state, tmp / f"state-rank{rank}.pt")
    sync()  # every rank's file is written before the manifest

    if rank == 0:
        files = ["model.pt", "optimizer.pt", "trainer_state.pt"] + [
            f"rng-rank{r}.pt" for r in range(world_size)
        ]
        if rank_state is not None:
            files += [f"state-rank{r}.pt" for r in range(world_size)]
        missing = [f for f in files if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(
                f"checkpoint {tmp}: files missing after the barrier: {missing}"
            )
        manifest = {
            "format": "fgc-checkpoint",
            "version": 1,
            "step": step,
            "config_hash": (
                trainer_state.get("config_hash")
                if isinstance(trainer_state, dict)
                else None
            ),
            "world_size": world_size,
            "files": files,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # saving a step again (e.g. after resuming): move the old one aside, then drop it
            old = root / f"{TMP_PREFIX}old-{name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
        _remove_stale_tmp(root)
        if keep_last_n:
            _apply_retention(root, keep_last_n, keep=final)
    sync()  # nobody returns before the checkpoint is complete
    return final


def _remove_stale_tmp(root: Path) -> None:
    """Remove ``.tmp-*`` leftovers of interrupted saves (only rank 0 saves, one at a time)."""
    for child in root.iterdir():
        if child.name.startswith(TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _apply_retention(root: Path, keep_last_n: int, keep: Path) -> None:
    complete = _complete_checkpoints(root)
    survivors = {p for _, p in complete[-keep_last_n:]} | {keep}
    if complete:
        survivors.add(complete[-1][1])  # the newest complete one, whatever happens
    for _, path in complete:
        if path not in survivors:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint under ``OUTPUT_DIR/checkpoints``, or None.

    ``latest`` is trusted when it names a complete checkpoint; otherwise (missing, stale or
    pointing at a deleted directory) the complete ``step-*`` directory with the highest step wins.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(name) and _is_complete(root / name):
            return root / name
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def resolve_resume(arg: str, output_dir) -> Path | None:
    """Implement ``--resume auto|never|PATH``.

    ``never``: None. ``auto``: the newest complete checkpoint, or None. PATH: that checkpoint; a
    missing path or one without ``manifest.json`` is a RunError naming it.
    """
    if arg == "never":
        return None
    if arg == "auto":
        return find_checkpoint(output_dir)
    path = Path(arg)
    if not path.exists():
        raise RunError("no such checkpoint", path=path)
    if not path.is_dir():
        raise RunError(
            "not a checkpoint directory (expected e.g. OUTPUT_DIR/checkpoints/step-00000100)",
            path=path,
        )
    if not _is_complete(path):
        raise RunError(
            "incomplete checkpoint: it has no manifest.json (its save did not finish)",
            path=path,
        )
    return path


def load_checkpoint(path, rank: int = 0) -> dict:
    """Load a complete checkpoint onto the CPU.

    Returns ``{"model", "optimizer", "trainer_state", "rng", "rank_state", "manifest"}``; ``rng``
    and ``rank_state`` are this rank's RNG states and own state, or None when the checkpoint has
    none for this rank (saved by fewer ranks, or without per-rank state).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RunError(
            "incomplete checkpoint: it has no manifest.json (its save did not finish)",
            path=path,
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunError(f"invalid JSON: {err}", path=manifest_path) from None
    for fname in ("model.pt", "optimizer.pt", "trainer_state.pt"):
        if not (path / fname).is_file():
            raise RunError(f"checkpoint file {fname} is missing", path=path / fname)
    rng_path = path / f"rng-rank{rank}.pt"
    rank_path = path / f"state-rank{rank}.pt"
    return {
        "model": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
        # our own files: optimizer and trainer state may hold plain Python objects
        "optimizer": torch.load(
            path / "optimizer.pt", map_location="cpu", weights_only=False
        ),
        "trainer_state": torch.load(
            path / "trainer_state.pt", map_location="cpu", weights_only=False
        ),
        "rng": (
            torch.load(rng_path, map_location="cpu", weights_only=False)
            if rng_path.is_file()
            else None
        ),
        "rank_state": (
            torch.load(rank_path, map_location="cpu", weights_only=False)
            if rank_path.is_file()
            else None
        ),
        "manifest": manifest,
    }
