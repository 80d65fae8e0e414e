"""fgc's on-disk cache: results of pure, slow steps of a build, keyed by a hash of all their input.

Three steps use it, the largest shares of a build after the torch import: black's formatting
of a generated source (``fgc.codegen.package.format_python``), the vendoring of library code
into model.py (``fgc.codegen.vendor.vendor_symbols``, when no user code is involved) and each
module's imports for the runtime's import closure (``fgc.codegen.closure``). A rebuild of an
unchanged config, or of one whose change leaves a file alone (a new ``max_steps`` leaves
``model.py`` as it was), then reads the results back instead of computing them. A cached result
is the result: the key hashes the whole input and the code or tool version that made it, and an
entry is used only when the hash of its content, stored with it, matches (a damaged entry is a
miss).

Where: ``$FGC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fgc``, else ``~/.cache/fgc``;
``FGC_CACHE_DIR=off`` turns the cache off. Entries are written atomically (a temporary file
renamed into place), so concurrent builds share it safely. Removing the directory is always
safe. A cache that cannot be read or written (read-only home, full disk) is skipped without a
word: it only ever saves time.

Its size is bounded: a read marks an entry used (its modification time), and at most once an
hour a command that generates code ends with :func:`maybe_prune`, which removes the least
recently used entries of a cache larger than ``$FGC_CACHE_MAX_MB`` (512 by default) until it
holds three quarters of that. It removes only fgc's own files: entries (``KIND/xx/`` + a
sha256 in hex starting with ``xx``, of a kind of :data:`KINDS`) and temporary files of theirs
that a killed build left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

OFF = "off"
# the kinds of result kept, each in its own directory: what fgc writes and may remove
KINDS = ("black", "vendor", "closure-edges")
DEFAULT_MAX_MB = 512
PRUNE_EVERY_S = 3600
STAMP = ".last-pruned"
_ENTRY = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    configured = os.environ.get("FGC_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in (OFF, "") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fgc"


def key(*parts: str) -> str:
    """The key of a result: the sha256 of its inputs, each length-prefixed (no two different
    part lists share a key)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(f"{len(data)}:".encode("ascii"))
        h.update(data)
    return h.hexdigest()


def get(kind: str, k: str) -> str | None:
    """The text stored under KIND/K, or None (missing, damaged, unreadable or the cache off)."""
    root = cache_dir()
    if root is None:
        return None
    path = root / kind / k[:2] / k
    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, sep, body = data.partition(b"\n")
    if not sep or hashlib.sha256(body).hexdigest().encode("ascii") != digest:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        os.utime(path)  # used now: the last to be pruned
    except OSError:
        pass
    return text


def put(kind: str, k: str, text: str) -> None:
    """Store TEXT under KIND/K, atomically; a failure to write is ignored."""
    root = cache_dir()
    if root is None:
        return
    assert kind in KINDS, kind
    path = root / kind / k[:2] / k
    body = text.encode("utf-8")
    data = hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body
    tmp = None
    try:
        # private, like the home it sits in: a cached formatted file becomes generated code
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:  # our own temporary file, never renamed into place
            try:
                os.unlink(tmp)
            except OSError:
                pass


def max_bytes() -> int:
    """The most the cache may hold: ``$FGC_CACHE_MAX_MB`` MiB (a number; else the default)."""
    try:
        mb = float(os.environ.get("FGC_CACHE_MAX_MB", DEFAULT_MAX_MB))
    except ValueError:
        mb = DEFAULT_MAX_MB
    return int(max(mb, 0) * 2**20)


def _own_files(root: Path):
    """(path, size, modification time, is a temporary file) of each file fgc wrote in ROOT."""
    for kind in KINDS:
        try:
            shards = list(os.scandir(root / kind))
        except OSError:
            continue
        for shard in shards:
            if not (len(shard.name) == 2 and shard.is_dir(follow_symlinks=False)):
                continue
            try:
                files = list(os.scandir(shard.path))
            except OSError:
                continue
            for f in files:
                entry = _ENTRY.fullmatch(f.name) is not None and f.name[:2] == shard.name
                if not (entry or f.name.startswith(".tmp-")) or not f.is_file(follow_symlinks=False):
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield Path(f.path), st.st_size, st.st_mtime, not entry


def prune(root: Path | None = None, limit: int | None = None, now: float | None = None) -> int:
    """When the cache ROOT (default: :func:`cache_dir`) holds more than LIMIT bytes (default:
    :func:`max_bytes`), remove its least recently used entries until it holds at most three
    quarters of LIMIT; temporary files a killed build left (over a day old) go in any case.
    Only fgc's own files are removed. Returns the bytes removed."""
    root = cache_dir() if root is None else root
    if root is None:
        return 0
    limit = max_bytes() if limit is None else limit
    now = time.time() if now is None else now
    files = sorted(_own_files(root), key=lambda f: f[2])  # the least recently used first
    total = sum(size for _, size, _, _ in files)
    removed = 0
    for path, size, mtime, temporary in files:
        stale = temporary and now - mtime > 86400
        if not stale and (temporary or total - removed <= limit * 3 // 4 or total <= limit):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed += size
    return removed


def maybe_prune(now: float | None = None) -> None:
    """:func:`prune`, when the cache was not pruned in the last hour (its STAMP file says when);
    run by the commands that generate code, when they are done. Any failure is ignored."""
    root = cache_dir()
    if root is None:
        return
    now = time.time() if now is None else now
    stamp = root / STAMP
    try:
        if now - stamp.stat().st_mtime < PRUNE_EVERY_S:
            return
    except OSError:
        if not root.is_dir():
            return  # nothing cached yet
    try:
        stamp.touch()
        os.utime(stamp, (now, now))
    except OSError:
        return
    prune(root, now=now)
