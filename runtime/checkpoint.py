"""Atomic, complete, verified checkpoints.

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
        manifest.json       written last: files with their sizes and sha256, step, config_hash,
                            world_size
      latest                a text file naming the newest complete checkpoint, e.g. "step-00000100"

A checkpoint is complete iff its ``manifest.json`` exists. It is written into
``checkpoints/.tmp-step-00000100``, fsynced, then renamed into place, so a crash never leaves a
``step-*`` directory half written; ``latest`` is then replaced atomically. With several ranks the
output dir must be on a filesystem every rank sees.

A checkpoint *verifies* when every file its manifest lists is there with the size and sha256 the
manifest records (manifest version 2; a version-1 manifest has no sums, and its files' zip CRCs
are checked instead) and loads. Every file is loaded with ``torch.load(weights_only=True)``:
tensors and plain data only, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .errors import RunError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fgc-checkpoint"
MANIFEST_VERSION = 2
TMP_PREFIX = ".tmp-"
METRICS = "metrics.jsonl"
# what rank 0 writes; every other file of a checkpoint is one rank's own
RANK0_FILES = ("model.pt", "optimizer.pt", "trainer_state.pt")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_CHUNK = 1 << 20  # bytes read at a time while hashing


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``: ``step-00000100``."""
    return f"step-{step:08d}"


def rng_state() -> dict:
    """This process's RNG states: Python ``random``, torch CPU and, when present, every CUDA device.

    Python's state is a tuple of ints, which ``torch.load(weights_only=True)`` reads back as it is.
    """
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


def file_digest(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex digest}`` of the file at PATH, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


# ---- agreement between ranks ----------------------------------------------------------------


def agree(dist, decide: Callable, *args, **kwargs):
    """Run ``decide(*args, **kwargs)`` on rank 0 only, and give its result to every rank.

    The result must be JSON data (None, numbers, strings, lists, dicts). A RunError raised by
    DECIDE is raised on every rank (quiet on the others), so all ranks fail together with rank 0's
    line. DIST is the trainer's ``DistInfo`` (None, or a single process: DECIDE simply runs
    here). Every rank calls it (a collective: two broadcasts).
    """
    outcome = None
    if dist is None or dist.is_main:
        try:
            outcome = {"value": decide(*args, **kwargs)}
        except RunError as err:
            outcome = {"error": err.message, "path": err.path}
        except BaseException:
            if dist is not None and dist.distributed:
                # a bug on rank 0: the other ranks fail too instead of waiting for an answer
                distributed.broadcast_json({"crashed": True}, dist)
            raise
    if dist is not None:
        outcome = distributed.broadcast_json(outcome, dist)
    if "crashed" in outcome:
        raise RuntimeError(
            "rank 0 failed while checking the output directory (its traceback says why)"
        )
    if "error" in outcome:
        # rank 0 prints the line; the others exit with status 2 without one
        raise RunError(
            outcome["error"],
            path=outcome["path"],
            quiet=not (dist is None or dist.is_main),
        )
    return outcome["value"]


# ---- non-finite values ----------------------------------------------------------------------


def nonfinite(**values) -> str | None:
    """What is wrong with the first of VALUES (floats or one-element tensors) that is nan or
    infinite, e.g. ``"the loss is nan"`` for ``loss=...`` (an underscore in a name reads as a
    space: ``grad_norm`` is "the grad norm"); None when all are finite. A value of None (not
    measured) is skipped."""
    for name, value in values.items():
        if value is None:
            continue
        number = float(value)
        if not math.isfinite(number):
            return f"the {name.replace('_', ' ')} is {number}"
    return None


def _untouched(output_dir) -> str:
    newest = find_checkpoint(output_dir)
    if newest is None:
        return "no checkpoint was saved before it"
    return f"the newest checkpoint ({newest.name}) is untouched"


def nonfinite_error(
    step: int, problem: str, output_dir, *, stepped: bool = False, quiet: bool = False
) -> RunError:
    """The RunError that stops a run at STEP whose loss or gradient norm is not finite (PROBLEM,
    from :func:`nonfinite`). STEPPED: the optimizer already stepped inside the backward
    (optimizer_in_backward), so the weights are spoilt and are not saved. QUIET: every rank raises
    it, and only rank 0 prints it."""
    if stepped:
        action = "the optimizer stepped inside the backward (optimizer_in_backward), so the weights are not saved"
    else:
        action = "stopping before the optimizer step"
    return RunError(
        f"step {step}: {problem}; {action}; {_untouched(output_dir)}",
        path=output_dir,
        quiet=quiet,
    )


def nonfinite_tensor(state) -> str | None:
    """``"tensor 'NAME' holds nan"`` for the first floating-point tensor of the state dict STATE
    with a nan or infinite value; None when every one is finite (or STATE is None)."""
    if state is None:
        return None
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = value[~finite].flatten()[0].item()
                return f"tensor {name!r} holds {bad}"
    return None


def _refuse_nonfinite_weights(model_state, step: int, output_dir) -> None:
    problem = nonfinite_tensor(model_state)
    if problem is not None:
        raise RunError(
            f"step {step}: the model's weights are not finite ({problem}); not saving them; "
            f"{_untouched(output_dir)}",
            path=output_dir,
        )


# ---- saving ---------------------------------------------------------------------------------


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
    dist=None,
) -> Path:
    """Write the checkpoint of ``step`` and return its directory; every rank calls this.

    Rank 0 writes the model, optimizer and trainer state (other ranks may pass None for them);
    every rank writes its RNG states and, when ``rank_state`` is given (by every rank), that
    object as ``state-rank{rank}.pt``. ``barrier`` (a no-op when None; with ``dist``, the trainer's
    ``DistInfo``, a barrier of its process group) separates the phases so the manifest is written
    only after every rank has written. Then rank 0 records each file's size and sha256 in the
    manifest, renames the directory into place, updates ``latest``, removes stale ``.tmp-*``
    directories and, with ``keep_last_n`` (None or 0: keep all), deletes older complete
    checkpoints, never the newest complete one nor the newest one that verifies.

    A model state with a nan or infinite value is never written: every rank raises a RunError
    (with ``dist``; rank 0 checks) and the checkpoints stay as they were.
    """

    def sync() -> None:
        if barrier is not None:
            barrier()
        elif dist is not None:
            distributed.barrier(dist)

    root = Path(output_dir) / CHECKPOINTS
    name = step_dir_name(step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"

    if rank == 0 or dist is not None:  # every rank with DIST: they fail together
        agree(dist, _refuse_nonfinite_weights, model_state, step, str(output_dir))
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
        files = list(RANK0_FILES) + [f"rng-rank{r}.pt" for r in range(world_size)]
        if rank_state is not None:
            files += [f"state-rank{r}.pt" for r in range(world_size)]
        missing = [f for f in files if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(
                f"checkpoint {tmp}: files missing after the barrier: {missing}"
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": step,
            "config_hash": (
                trainer_state.get("config_hash")
                if isinstance(trainer_state, dict)
                else None
            ),
            "world_size": world_size,
            "files": files,
            # read back from the disk: what a resume will compare against
            "contents": {f: file_digest(tmp / f) for f in files},
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
    """Keep the newest KEEP_LAST_N complete checkpoints, KEEP (just saved), the newest complete
    one and the newest one that verifies; delete the other complete ones."""
    complete = _complete_checkpoints(root)
    survivors = {p for _, p in complete[-keep_last_n:]} | {keep}
    if complete:
        survivors.add(complete[-1][1])  # the newest complete one, whatever happens
    for _, path in reversed(complete):
        # KEEP was just written and its sums just read back: it verifies. A newer one (a resume
        # from an older checkpoint) is checked, so a damaged newest one never costs the good one.
        if path == keep or verify_checkpoint(path, load=False) is None:
            survivors.add(path)
            break
    for _, path in complete:
        if path not in survivors:
            shutil.rmtree(path, ignore_errors=True)


# ---- verifying and choosing -----------------------------------------------------------------


def _plain_name(name) -> bool:
    """A file name without a directory part (what a manifest may list)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
    )


def read_manifest(path) -> tuple[dict | None, str | None]:
    """The manifest of the checkpoint directory PATH, and None; or None and what is wrong."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as err:
        return None, f"{MANIFEST} cannot be read ({err.strerror})"
    except ValueError:
        return None, f"{MANIFEST} is not valid JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"{MANIFEST} is not an fgc checkpoint manifest"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(_plain_name(f) for f in files):
        return None, f"{MANIFEST} has no valid list of files"
    for required in RANK0_FILES:
        if required not in files:
            return None, f"{MANIFEST} does not list {required}"
    if manifest.get("version") == 1:
        return manifest, None
    contents = manifest.get("contents")
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(contents, dict):
        return None, f"{MANIFEST} has an unknown version {manifest.get('version')!r}"
    for f in files:
        entry = contents.get(f)
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            return None, f"{MANIFEST} gives no size and sha256 for {f}"
    return manifest, None


def verify_checkpoint(path, *, load: bool = True) -> str | None:
    """What is wrong with the complete checkpoint directory PATH, or None when it verifies.

    Every file its manifest lists must be there with the size and sha256 the manifest records
    (a version-1 manifest records none: the files' zip CRCs are checked instead) and, with LOAD,
    must load with ``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read
    again), which also refuses a file that would run code.
    """
    path = Path(path)
    manifest, problem = read_manifest(path)
    if problem is not None:
        return problem
    for name in manifest["files"]:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if manifest["version"] == 1:
            problem = _zip_problem(file)
        else:
            want = manifest["contents"][name]
            try:
                got = file_digest(file)
            except OSError as err:
                return f"{name} cannot be read ({err.strerror})"
            if got["size"] != want["size"]:
                problem = f"{name} has {got['size']:,} bytes, its manifest says {want['size']:,}"
            elif got["sha256"] != want["sha256"]:
                problem = f"{name} does not match the sha256 its manifest records"
        if problem is None and load:
            try:
                load_file(file, mmap=True)
            except RunError as err:
                problem = f"{name}: {err.message}"
        if problem is not None:
            return problem
    return None


def _zip_problem(file: Path) -> str | None:
    """What is wrong with the zip archive torch.save wrote, checked against its CRCs."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return f"{file.name} is not a complete torch.save file (truncated?)"
    if bad is not None:
        return f"{file.name} is damaged (its member {bad} fails its CRC)"
    return None


def _newest_verified(root: Path, *, doing: str, hint: str) -> Path | None:
    """The checkpoint ``latest`` names when it verifies, else the newest one (by step) that does;
    one warning line on stderr when any was passed over. None when there is no checkpoint; a
    RunError when there are some and none verifies."""
    if not root.is_dir():
        return None
    passed = []
    order = []
    latest = root / LATEST
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            name = ""
        if not _STEP_DIR.match(name):
            passed.append(f"{LATEST} does not name a checkpoint ({name[:40]!r})")
        elif not (root / name).is_dir():
            passed.append(f"{LATEST} names {name}, which does not exist")
        elif not _is_complete(root / name):
            passed.append(f"{LATEST} names {name}, which is incomplete (no {MANIFEST})")
        else:
            order.append(root / name)
    order += [p for _, p in reversed(_complete_checkpoints(root)) if p not in order]
    for path in order:
        problem = verify_checkpoint(path)
        if problem is None:
            if passed:
                print(
                    f"warning: {root}: {'; '.join(passed)}; {doing} {path.name}",
                    file=sys.stderr,
                    flush=True,
                )
            return path
        passed.append(f"{path.name}: {problem}")
    if passed:
        raise RunError(
            f"no checkpoint here verifies ({'; '.join(passed)}): {hint}", path=root
        )
    return None


def find_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint under ``OUTPUT_DIR/checkpoints``, or None, unverified (see
    :func:`resolve_resume` for the verified choice).

    ``latest`` is trusted when it names a complete checkpoint; otherwise (missing, stale or
    pointing at a deleted directory) the complete ``step-*`` directory with the highest step wins.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        if _STEP_DIR.match(name) and _is_complete(root / name):
            return root / name
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def checkpoint_path(arg: str) -> Path:
    """The checkpoint directory ARG (``--resume PATH``, ``--checkpoint PATH``): a RunError naming
    it when it is missing, incomplete or does not verify."""
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
    problem = verify_checkpoint(path)
    if problem is not None:
        raise RunError(f"damaged checkpoint: {problem}", path=path)
    return path


def resolve_resume(arg: str, output_dir) -> Path | None:
    """Implement ``--resume auto|never|PATH``.

    ``never``: None. ``auto``: the checkpoint ``latest`` names, else the newest by step, the
    first of them that verifies (:func:`verify_checkpoint`; a warning line on stderr names what
    was passed over); None when there is none, a RunError when none verifies. PATH: that
    checkpoint; missing, incomplete or damaged is a RunError naming it.
    """
    if arg == "never":
        return None
    if arg == "auto":
        return _newest_verified(
            Path(output_dir) / CHECKPOINTS,
            doing="resuming from",
            hint="pass --resume PATH of a good one, or start over with --resume never --overwrite",
        )
    return checkpoint_path(arg)


def newest_verified(output_dir, *, doing: str, hint: str) -> Path | None:
    """The checkpoint ``--resume auto`` would use (see :func:`resolve_resume`), for another use:
    DOING names it in the warning (e.g. ``exporting``), HINT ends the error when none verifies.
    """
    return _newest_verified(Path(output_dir) / CHECKPOINTS, doing=doing, hint=hint)


def chosen_checkpoint(arg: str | None, output_dir, *, purpose: str, doing: str) -> Path:
    """The checkpoint a command reads (``--export-hf``, ``generate.py``): ``--checkpoint PATH``
    (an error unless it verifies), else the newest complete one in OUTPUT_DIR that verifies, as
    ``--resume auto`` would take. PURPOSE (``export``) and DOING (``exporting``) word the errors."""
    if arg is not None:
        return checkpoint_path(arg)
    found = newest_verified(output_dir, doing=doing, hint="pass --checkpoint PATH of a good one")
    if found is None:
        raise RunError(
            f"no complete checkpoint to {purpose} (train first, or pass --checkpoint PATH)",
            path=Path(output_dir) / CHECKPOINTS,
        )
    return found


def describe_run(output_dir) -> str | None:
    """What of a run OUTPUT_DIR holds (its complete checkpoints, a non-empty metrics.jsonl), in
    words; None when it holds neither."""
    output_dir = Path(output_dir)
    held = []
    complete = _complete_checkpoints(output_dir / CHECKPOINTS)
    if complete:
        newest = complete[-1][1].name
        held.append(
            f"1 checkpoint ({newest})"
            if len(complete) == 1
            else f"{len(complete)} checkpoints (the newest {newest})"
        )
    metrics = output_dir / METRICS
    try:
        with open(metrics, "rb") as f:
            records = sum(1 for line in f if line.strip())
    except OSError:
        records = 0
    if records:
        held.append(f"{METRICS} with {records} record{'s' if records > 1 else ''}")
    return " and ".join(held) or None


def start_over(output_dir, overwrite: bool) -> None:
    """``--resume never``: refuse (a RunError naming OUTPUT_DIR and what it holds) when the output
    dir holds a run, unless OVERWRITE; then remove that run's checkpoints (its metrics.jsonl is
    emptied when the metrics logger starts at step 0)."""
    held = describe_run(output_dir)
    if held is None:
        return
    if not overwrite:
        raise RunError(
            f"this output dir holds a run ({held}), which --resume never would replace: "
            "pass --overwrite to start over, or --resume auto to continue it",
            path=output_dir,
        )
    root = Path(output_dir) / CHECKPOINTS
    complete = _complete_checkpoints(root)
    if root.is_dir():
        # `latest` first: a crash half-way leaves no pointer at a removed checkpoint
        (root / LATEST).unlink(missing_ok=True)
        _remove_stale_tmp(root)
    for _, path in complete:
        shutil.rmtree(path)
    print(
        f"--overwrite: starting over in {output_dir} (removed {len(complete)} checkpoints)",
        flush=True,
    )


def choose_resume(
    arg: str, output_dir, dist=None, *, overwrite: bool = False
) -> Path | None:
    """The checkpoint a run starts from (``--resume``, see :func:`resolve_resume`), with
    ``--resume never`` checked by :func:`start_over`. Rank 0 decides (it alone verifies and
    prints); every rank gets the same answer, or the same RunError. A collective."""
    chosen = agree(dist, _choose_resume, arg, str(output_dir), overwrite)
    return None if chosen is None else Path(chosen)


def _choose_resume(arg: str, output_dir: str, overwrite: bool) -> str | None:
    if arg == "never":
        start_over(output_dir, overwrite)
        return None
    if overwrite:
        raise RunError("--overwrite starts a run over: it goes with --resume never")
    path = resolve_resume(arg, output_dir)
    return None if path is None else str(path)


# ---- loading --------------------------------------------------------------------------------


def load_file(path: Path, mmap: bool = False):
    """``torch.load(PATH, weights_only=True)`` onto the CPU (memory-mapped with MMAP): tensors and
    plain data only, never code; a RunError naming PATH when it fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise RunError(
                f"not loaded: it holds a pickled {found.group(1)}, not only tensors and plain data "
                "(loading it could run code)",
                path=path,
            ) from None
        raise RunError(f"cannot load it: {_first_line(err)}", path=path) from None
    except Exception as err:  # a damaged file: zip, pickle or storage errors of every kind
        raise RunError(f"cannot load it: {_first_line(err)}", path=path) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_checkpoint(path, rank: int = 0) -> dict:
    """Load a complete checkpoint onto the CPU, every file with ``weights_only=True``.

    Returns ``{"model", "optimizer", "trainer_state", "rng", "rank_state", "manifest"}``; ``rng``
    and ``rank_state`` are this rank's RNG states and own state, or None when the checkpoint has
    none for this rank (saved by fewer ranks, or without per-rank state). A file that does not
    load (damaged, or holding anything but tensors and plain data) is a RunError naming it.
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
    for fname in RANK0_FILES:
        if not (path / fname).is_file():
            raise RunError(f"checkpoint file {fname} is missing", path=path / fname)
    rng_path = path / f"rng-rank{rank}.pt"
    rank_path = path / f"state-rank{rank}.pt"
    return {
        "model": load_file(path / "model.pt"),
        "optimizer": load_file(path / "optimizer.pt"),
        "trainer_state": load_file(path / "trainer_state.pt"),
        "rng": load_file(rng_path) if rng_path.is_file() else None,
        "rank_state": load_file(rank_path) if rank_path.is_file() else None,
        "manifest": manifest,
    }


# -- what a checkpoint holds of the model and optimizer, per layout -------------------------------


def does_not_fit(err: Exception, path, message: str = "the checkpoint does not fit this model") -> RunError:
    """The one-line error for the checkpoint at PATH whose state a load refused with ERR:
    "MESSAGE: <the error's last line>"."""
    text = str(err).strip()
    return RunError(f"{message}: {text.splitlines()[-1].strip() if text else type(err).__name__}", path=path)


class ModelState:
    """What a checkpoint holds of a run whose every rank has the whole model and optimizer (one
    process, DDP): their state dicts, saved by rank 0, and restoring them on every rank.

    The other layouts give the same three methods, in the runtime module of their dimension:
    :class:`fgc_runtime.parallel.ShardedState` (FSDP2 and tensor-parallel shards),
    :class:`fgc_runtime.pipeline.PipelineState` (a pipeline's stages) and
    :class:`fgc_runtime.diloco.DiLoCoState` (DiLoCo's global and per-worker state).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dicts(self, tokens_seen: int) -> tuple:
        """``(model state, optimizer state, this rank's own state or None)`` to save, from this
        rank's token count TOKENS_SEEN; every rank calls it (a layout may gather)."""
        return self.model.state_dict(), self.optimizer.state_dict(), None

    def total_tokens(self, tokens_seen: int) -> int:
        """The run's token count, from this rank's TOKENS_SEEN; every rank calls it."""
        return tokens_seen

    def load(self, state: dict, path) -> int:
        """Restore the model and optimizer from STATE (:func:`load_checkpoint`'s, of the checkpoint
        at PATH); the token count this rank goes on from. A state that does not fit is a RunError."""
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, ValueError) as err:  # a different model shape
            raise does_not_fit(err, path) from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            # e.g. the checkpoint of another trainer type or optimizer in the same output dir
            raise does_not_fit(
                err,
                path,
                f"the checkpoint's optimizer state does not fit this run's optimizer ({type(self.optimizer).__name__})",
            ) from None
        return state["trainer_state"]["tokens_seen"]
