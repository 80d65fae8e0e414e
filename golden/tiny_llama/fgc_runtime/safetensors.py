"""A small reader and writer of the safetensors format, in pure torch (no `safetensors` package).

The format: an 8-byte little-endian unsigned header length N, then N bytes of JSON, then the raw
little-endian bytes of every tensor. The header maps each tensor name to
``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`` (offsets into the data that
follows the header) and may hold ``"__metadata__"``, a str → str mapping. A sharded checkpoint
is several such files plus ``model.safetensors.index.json``:
``{"metadata": {"total_size": BYTES}, "weight_map": {name: file}}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path

import torch

from .errors import RunError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}

if sys.byteorder != "little":  # the raw bytes below are the machine's own
    raise ImportError("fgc_runtime.safetensors supports little-endian machines only")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, row-major (a copy taken from CPU memory)."""
    tensor = tensor.detach().to("cpu").contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    return ctypes.string_at(tensor.data_ptr(), nbytes) if nbytes else b""


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write TENSORS to PATH as one safetensors file.

    As the reference writer does, the data is laid out widest dtype first, then by name, so every
    tensor starts aligned to its element size. Tensors that share memory are written as separate
    copies (the caller decides which names to keep).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in NAMES:
            raise ValueError(f"safetensors: dtype {tensor.dtype} of {name!r} is not supported")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(_tensor_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())


def read_header(path) -> tuple[dict, dict[str, str], int]:
    """The tensor entries, the metadata and the byte offset where the data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise RunError("not a safetensors file: too short", path=path)
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise RunError("not a safetensors file: its header length exceeds the file", path=path)
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as err:
        raise RunError(f"cannot read: {err.strerror}", path=path) from None
    except (UnicodeDecodeError, ValueError):
        raise RunError("not a safetensors file: its header is not JSON", path=path) from None
    if not isinstance(header, dict):
        raise RunError("not a safetensors file: its header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
        except (KeyError, TypeError, ValueError):
            raise RunError(f"bad header entry for tensor {name!r} (dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r})", path=path) from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise RunError(f"tensor {name!r}: data_offsets {entry['data_offsets']} do not fit its shape or the file", path=path)
    return header, metadata, 8 + length


class SafetensorsFile:
    """One safetensors file, read tensor by tensor (``keys()``, ``get(name)``, ``metadata``)."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries, self.metadata, self.data_start = read_header(self.path)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> torch.Tensor:
        """The tensor NAME, on the CPU, in its stored dtype (it owns its memory)."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            buffer = bytearray(f.read(end - begin))
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def load_file(path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, by name."""
    file = SafetensorsFile(path)
    return {name: file.get(name) for name in file.keys()}


def save_sharded(
    tensors: dict[str, torch.Tensor],
    directory,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write TENSORS into DIRECTORY as ``model.safetensors``, or, when they hold more than
    MAX_SHARD_BYTES, as ``model-0000i-of-0000n.safetensors`` shards (name order, each at most
    MAX_SHARD_BYTES unless one tensor alone is bigger) with ``model.safetensors.index.json``.
    Returns the file names written."""
    directory = Path(directory)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_file(tensors, directory / SINGLE_FILE, metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, directory / file, metadata)
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files + [INDEX_FILE]


def index_dir(directory) -> dict[str, "SafetensorsFile"]:
    """Which file holds each tensor of a Hugging Face model directory (``model.safetensors``, or
    the shards ``model.safetensors.index.json`` names), reading only the files' headers: a tensor
    is read when its file's ``get(name)`` is called. A missing file is a RunError naming it."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise RunError("not a safetensors index: no weight_map", path=index_path) from None
        where: dict[str, SafetensorsFile] = {}
        for file in sorted(set(weight_map.values())):
            shard_path = directory / file
            if not shard_path.is_file():
                raise RunError(f"the shard {file} named by {INDEX_FILE} is missing", path=shard_path)
            shard = SafetensorsFile(shard_path)
            for name in shard.keys():
                if weight_map.get(name) == file:
                    where[name] = shard
        missing = sorted(set(weight_map) - set(where))
        if missing:
            raise RunError(f"tensor {missing[0]!r} is not in the shard the index names", path=index_path)
        return where
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise RunError(f"no {SINGLE_FILE} or {INDEX_FILE} here", path=directory)
    file = SafetensorsFile(single)
    return {name: file for name in file.keys()}


def load_dir(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names. A missing file is a RunError naming it."""
    return {name: file.get(name) for name, file in index_dir(directory).items()}