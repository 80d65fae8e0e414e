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
renamed into place), so concurrent builds share it safely. fgc never deletes an entry; removing
the directory is always safe. A cache that cannot be read or written (read-only home, full disk)
is skipped without a word: it only ever saves time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

OFF = "off"


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
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def put(kind: str, k: str, text: str) -> None:
    """Store TEXT under KIND/K, atomically; a failure to write is ignored."""
    root = cache_dir()
    if root is None:
        return
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
