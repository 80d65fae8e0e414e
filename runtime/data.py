"""Token shards (docs/package.md, token shards): writing them, memory-mapping them, and sampling batches.

A shard directory holds::

    meta.json   {"dtype": "uint16"|"uint32", "eos_id": int, "format": "fgc-tokens",
                 "tokenizer": str, "version": 1, "vocab_size": int}
    train.bin   the training tokens
    val.bin     the validation tokens (possibly none)
    train.mask.bin, val.mask.bin  (only when meta.json says "loss_mask": true) the loss masks
    tokenizer.json  (only when "tokenizer" is "tokenizer.json") the Hugging Face tokenizer the
                    tokens come from, readable with the ``tokenizers`` package; fgc data also
                    copies a tokenizer directory's tokenizer_config.json,
                    special_tokens_map.json and tokenizer.model next to it when it has them

``"tokenizer"`` is ``"byte"`` for the built-in byte tokenizer (:class:`ByteTokenizer`: vocab_size
257, eos_id 256) and ``"tokenizer.json"`` for a Hugging Face tokenizer saved in the directory;
``eos_id`` is then the id of its end-of-text token, which separates the documents.

Each ``.bin`` file is a fixed 64-byte little-endian header followed by the tokens::

    offset  size  field
    0       8     magic b"FGCTOKS\\x00"
    8       4     uint32 format version (1)
    12      4     uint32 itemsize in bytes (2 for uint16, 4 for uint32)
    16      8     uint64 token count
    24      40    zero padding
    64      ...   token count * itemsize bytes of little-endian token ids

Every document is followed by ``eos_id``. The dtype is uint16 when ``vocab_size <= 65536``, else
uint32. Readers memory-map the file, so opening a shard costs nothing whatever its size.

Chat shards (``fgc data --format chat``) also have a loss mask per split, ``train.mask.bin`` and
``val.mask.bin``: the same 64-byte header with itemsize 1 and the same token count, then one byte
per token, 1 where the token is a training target (an assistant's content and the token that ends
its turn) and 0 elsewhere (the document separators included). ``meta.json`` then says
``"loss_mask": true`` and names ``"chat_template"``, ``"eos_ids"`` and ``"added_tokens"``. The
batches of such a shard have label ``-100`` (ignored by the losses) wherever the mask of the
target token is 0; without a mask every label is a target.

Sampling is defined by the global sample index, so a run sees the same global batches whatever
its world size, and resuming at step ``s`` needs nothing but ``s`` (see :class:`BatchSampler`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import RunError

FORMAT = "fgc-tokens"
VERSION = 1
MAGIC = b"FGCTOKS\x00"
HEADER_SIZE = 64
# magic, version, itemsize, count, padding to 64 bytes
_HEADER = struct.Struct("<8sIIQ40x")
assert _HEADER.size == HEADER_SIZE

_ITEMSIZE = {"uint16": 2, "uint32": 4}
_TORCH_DTYPE = {"uint16": torch.uint16, "uint32": torch.uint32}
# array typecodes of exactly 2 and 4 bytes on this platform
_ARRAY_CODE = {"uint16": "H", "uint32": "I" if array("I").itemsize == 4 else "L"}
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> str:
    """The token dtype for a vocabulary: ``uint16`` up to 65536 ids, else ``uint32``."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def encode_header(count: int, itemsize: int) -> bytes:
    """The 64-byte header of a ``.bin`` file holding ``count`` tokens of ``itemsize`` bytes."""
    return _HEADER.pack(MAGIC, VERSION, itemsize, count)


IGNORE_INDEX = -100  # the label the losses skip (torch's cross_entropy default)
MASK_SUFFIX = ".mask.bin"


class _SplitWriter:
    """Writes one split (and its mask, when MASKED) to temporary files, renamed into place by
    :meth:`commit`; :meth:`abort` removes them. Each document is followed by ``eos_id`` (mask 0).
    """

    def __init__(
        self, path: Path, dtype: str, eos_id: int, vocab_size: int, masked: bool
    ):
        self.path = path
        self.dtype = dtype
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.count = 0
        self.documents = 0
        self.mask_path = path.with_name(path.stem + MASK_SUFFIX) if masked else None
        self._tmp = path.with_name(path.name + ".tmp")
        self._mask_tmp = (
            self.mask_path.with_name(self.mask_path.name + ".tmp") if masked else None
        )
        self._file = self._mask_file = None
        try:
            # the counts in the headers are patched in by finish()
            self._file = open(self._tmp, "wb")
            self._file.write(encode_header(0, _ITEMSIZE[dtype]))
            if masked:
                self._mask_file = open(self._mask_tmp, "wb")
                self._mask_file.write(encode_header(0, 1))
        except BaseException:
            self.abort()
            raise

    def add(self, doc: Sequence[int], mask: Sequence[int] | None = None) -> None:
        """Append one document (and its mask: one 0/1 per token) followed by ``eos_id``."""
        vocab_size = self.vocab_size
        try:
            buf = array(_ARRAY_CODE[self.dtype], doc)
        except OverflowError:
            buf = None
        if buf is None or (len(buf) and max(buf) >= vocab_size):
            bad = (
                max(doc)
                if buf is not None
                else next(i for i in doc if not 0 <= i < vocab_size)
            )
            raise ValueError(
                f"token id {bad} is out of range for vocab_size {vocab_size}"
            )
        if self._mask_file is not None:
            if mask is None or len(mask) != len(buf):
                raise ValueError(
                    f"a document of {len(buf)} tokens needs a mask of as many values, "
                    f"got {None if mask is None else len(mask)}"
                )
            try:
                mbuf = bytes(mask)
            except (ValueError, TypeError):
                mbuf = b"\x02"
            if mbuf.translate(None, b"\x00\x01"):
                raise ValueError("mask values must be 0 or 1")
            self._mask_file.write(mbuf + b"\x00")  # the separator is never a target
        buf.append(self.eos_id)
        if sys.byteorder != "little":
            buf.byteswap()
        self._file.write(buf.tobytes())
        self.count += len(buf)
        self.documents += 1

    def finish(self) -> None:
        """Patch the token counts into the headers and flush the temporary files to disk."""
        for f, itemsize in ((self._file, _ITEMSIZE[self.dtype]), (self._mask_file, 1)):
            if f is None:
                continue
            f.seek(0)
            f.write(encode_header(self.count, itemsize))
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def commit(self) -> None:
        """Rename the finished temporary files into place."""
        os.replace(self._tmp, self.path)
        if self._mask_tmp is not None:
            os.replace(self._mask_tmp, self.mask_path)

    def abort(self) -> None:
        """Close and remove the temporary files."""
        for f, tmp in ((self._file, self._tmp), (self._mask_file, self._mask_tmp)):
            if f is not None:
                f.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def _split_count(num_docs: int, val_fraction: float) -> int:
    """How many of the last documents go to val: at least one when asked and possible."""
    if val_fraction <= 0 or num_docs < 2:
        return 0
    # round first so that e.g. 100 * 0.29 = 28.999999999999996 counts as 29
    n_val = math.floor(round(num_docs * val_fraction, 9))
    return min(max(n_val, 1), num_docs - 1)


def _has_masks(directory: Path) -> bool:
    """Whether DIRECTORY holds chat shards: a token-shard meta.json with ``"loss_mask": true``."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("loss_mask") is True


def write_token_shards(
    out_dir,
    documents: Iterable,
    *,
    vocab_size: int,
    eos_id: int,
    tokenizer: str,
    val_fraction: float = 0.0,
    num_documents: int | None = None,
    loss_mask: bool = False,
    extra_meta: dict | None = None,
    before_commit=None,
) -> dict:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` into ``out_dir``.

    ``documents`` yields one sequence of token ids per document, or with ``loss_mask`` one
    ``(ids, mask)`` pair (a 0/1 per token; ``SPLIT.mask.bin`` are written too and meta.json says
    ``"loss_mask": true``); each document is followed by ``eos_id`` (mask 0). The last
    ``val_fraction`` of the documents (by count; at least one when ``val_fraction > 0`` and there
    are two or more documents) go to ``val.bin``, which may hold no tokens. With
    ``num_documents`` (the count ``documents`` yields) the documents are streamed to disk, never
    held in memory. Everything is written to temporary files first: an exception from
    ``documents`` leaves ``out_dir`` as it was (a directory this call created is removed). Then
    ``before_commit(out_dir)``, when given, runs (e.g. to move tokenizer files in), the files are
    renamed into place, and meta.json is written last, with ``extra_meta`` merged in (a dict, or
    a function called once the documents are written that returns one). The bytes
    written depend only on the arguments. Returns the meta dict plus ``train_tokens``,
    ``val_tokens``, ``train_documents`` and ``val_documents``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is out of range for vocab_size {vocab_size}")
    if num_documents is None:
        documents = list(documents)
        num_documents = len(documents)
    n_train = num_documents - _split_count(num_documents, val_fraction)

    dtype = dtype_for_vocab(vocab_size)
    out = Path(out_dir)
    created = not out.exists()
    # masks this function wrote before (the directory's meta.json says so): only those are removed
    # when text shards replace chat shards
    stale_masks = _has_masks(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = []
    try:
        for split in SPLITS:
            writers.append(
                _SplitWriter(out / f"{split}.bin", dtype, eos_id, vocab_size, loss_mask)
            )
        train, val = writers
        index = 0
        for item in documents:
            writer = train if index < n_train else val
            if loss_mask:
                writer.add(*item)
            else:
                writer.add(item)
            index += 1
        if index != num_documents:
            raise ValueError(f"expected {num_documents} documents, got {index}")
        for writer in writers:
            writer.finish()
        if before_commit is not None:
            before_commit(out)
    except BaseException:
        for writer in writers:
            writer.abort()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    for writer in writers:
        writer.commit()
    if not loss_mask and stale_masks:
        # masks of an earlier chat run in this directory would no longer match the tokens
        for split in SPLITS:
            (out / f"{split}{MASK_SUFFIX}").unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": int(vocab_size),
        "dtype": dtype,
        "eos_id": int(eos_id),
        "tokenizer": str(tokenizer),
    }
    if loss_mask:
        meta["loss_mask"] = True
    meta.update((extra_meta() if callable(extra_meta) else extra_meta) or {})
    # meta.json last: a directory with meta.json has all its other files
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "meta.json")
    return {
        **meta,
        "train_tokens": train.count,
        "val_tokens": val.count,
        "train_documents": train.documents,
        "val_documents": val.documents,
    }


def read_meta(data_dir) -> dict:
    """Read and validate ``DATA_DIR/meta.json``; every problem is a RunError naming the path."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise RunError(
            "no such token-shard directory (make one with `fgc data`)", path=data_dir
        )
    if not data_dir.is_dir():
        raise RunError(
            "not a directory; expected a token-shard directory", path=data_dir
        )
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise RunError(
            "missing meta.json: not a token-shard directory (make one with `fgc data`)",
            path=meta_path,
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"invalid JSON: {err}", path=meta_path) from None
    if not isinstance(meta, dict):
        raise RunError("expected a JSON object", path=meta_path)
    if meta.get("format") != FORMAT:
        raise RunError(
            f"format is {meta.get('format')!r}, expected {FORMAT!r}", path=meta_path
        )
    if meta.get("version") != VERSION:
        raise RunError(
            f"unsupported version {meta.get('version')!r}, expected {VERSION}",
            path=meta_path,
        )
    if meta.get("dtype") not in _ITEMSIZE:
        raise RunError(
            f"dtype is {meta.get('dtype')!r}, expected 'uint16' or 'uint32'",
            path=meta_path,
        )
    for key in ("vocab_size", "eos_id"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RunError(
                f"{key} must be a non-negative integer, got {value!r}", path=meta_path
            )
    if not isinstance(meta.get("loss_mask", False), bool):
        raise RunError(
            f"loss_mask must be true or false, got {meta['loss_mask']!r}",
            path=meta_path,
        )
    return meta


def _map_bin(
    path: Path, dtype: str | None, missing: str
) -> tuple[torch.Tensor, mmap.mmap | None]:
    """Memory-map a ``.bin`` file of ``dtype`` tokens (None: a mask, one uint8 per token) after
    checking its header and size; every problem is a RunError naming the path (MISSING when absent).
    """
    if not path.is_file():
        raise RunError(missing, path=path)
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise RunError(
            f"truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header",
            path=path,
        )
    torch_dtype = torch.uint8 if dtype is None else _TORCH_DTYPE[dtype]
    with open(path, "rb") as f:
        magic, version, itemsize, count = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise RunError(
                f"not an fgc token file: magic is {magic!r}, expected {MAGIC!r}",
                path=path,
            )
        if version != VERSION:
            raise RunError(
                f"unsupported token-file version {version}, expected {VERSION}",
                path=path,
            )
        if dtype is None and itemsize != 1:
            raise RunError(
                f"itemsize is {itemsize} bytes but a mask has 1 byte per token",
                path=path,
            )
        if dtype is not None and itemsize != _ITEMSIZE[dtype]:
            raise RunError(
                f"itemsize is {itemsize} bytes but meta.json says dtype {dtype} ({_ITEMSIZE[dtype]} bytes)",
                path=path,
            )
        expected = HEADER_SIZE + count * itemsize
        if size != expected:
            raise RunError(
                f"size mismatch: the header says {count} tokens ({expected} bytes with header) "
                f"but the file has {size} bytes",
                path=path,
            )
        if count == 0:
            return torch.empty(0, dtype=torch_dtype), None
        # ACCESS_COPY gives a writable (copy-on-write) buffer, which torch.frombuffer wants,
        # without ever writing to the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tokens = torch.frombuffer(mm, dtype=torch_dtype, offset=HEADER_SIZE, count=count)
    if dtype is not None and sys.byteorder != "little":
        # the file is little-endian; copy once on big-endian hosts
        buf = array(_ARRAY_CODE[dtype], mm[HEADER_SIZE:])
        buf.byteswap()
        tokens = torch.tensor(buf.tolist(), dtype=torch.int64).to(torch_dtype)
    return tokens, mm


class TokenShard:
    """One split of a token-shard directory, memory-mapped.

    ``tokens`` is a zero-copy 1-D uint16/uint32 tensor over the file (convert slices with
    ``.long()`` before use: few torch ops support unsigned 16/32-bit ints). ``mask`` is the
    split's loss mask (a uint8 tensor as long as ``tokens``) when meta.json says
    ``"loss_mask": true``, else None.
    """

    def __init__(
        self,
        path: Path,
        meta: dict,
        tokens: torch.Tensor,
        mm: mmap.mmap | None,
        mask: torch.Tensor | None = None,
        mask_mm: mmap.mmap | None = None,
    ):
        self.path = path
        self.meta = meta
        self.tokens = tokens
        self.mask = mask
        self._mmap = mm  # keeps the mapping alive as long as the tensor
        self._mask_mmap = mask_mm

    @classmethod
    def open(cls, data_dir, split: str = "train") -> "TokenShard":
        """Open ``DATA_DIR/SPLIT.bin``, validating it against ``meta.json``.

        Every problem (missing directory or file, bad JSON, wrong format or version, bad magic,
        itemsize not matching the meta dtype, size not matching the count) is a RunError naming
        the offending path.
        """
        if split not in SPLITS:
            raise RunError(
                f"unknown split {split!r}, expected one of {', '.join(SPLITS)}",
                path=data_dir,
            )
        meta = read_meta(data_dir)
        path = Path(data_dir) / f"{split}.bin"
        tokens, mm = _map_bin(
            path, meta["dtype"], f"missing {split}.bin in the token-shard directory"
        )
        mask = mask_mm = None
        if meta.get("loss_mask"):
            mask_path = Path(data_dir) / f"{split}{MASK_SUFFIX}"
            mask, mask_mm = _map_bin(
                mask_path,
                None,
                f"missing {split}{MASK_SUFFIX}: meta.json says the shards have loss masks",
            )
            if mask.numel() != tokens.numel():
                raise RunError(
                    f"the mask has {mask.numel()} values but {path.name} has {tokens.numel()} tokens",
                    path=mask_path,
                )
        return cls(path, meta, tokens, mm, mask, mask_mm)

    def __len__(self) -> int:
        return self.tokens.numel()

    def max_token(self) -> int:
        """The largest token id in the split (-1 when empty), read in chunks to bound memory."""
        best = -1
        chunk = 1 << 24
        for start in range(0, len(self), chunk):
            best = max(best, int(self.tokens[start : start + chunk].long().max()))
        return best


def check_vocab(shard: TokenShard, vocab_size: int) -> None:
    """RunError naming the path if the shard's ids do not fit a model with ``vocab_size`` ids."""
    meta_vocab = shard.meta["vocab_size"]
    if meta_vocab > vocab_size:
        raise RunError(
            f"the tokenizer's vocab_size is {meta_vocab} but the model's vocab_size is {vocab_size}",
            path=shard.path.parent / "meta.json",
        )
    top = shard.max_token()
    if top >= vocab_size:
        raise RunError(
            f"token id {top} does not fit the model's vocab_size {vocab_size}",
            path=shard.path,
        )


def _rank_slice(
    global_size: int, rank: int, world_size: int, what: str
) -> tuple[int, int]:
    """The contiguous [start, stop) of a global batch that ``rank`` takes."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise RunError(f"rank {rank} is out of range for world size {world_size}")
    if global_size % world_size != 0:
        raise RunError(
            f"{what} {global_size} is not divisible by the world size {world_size}"
        )
    per_rank = global_size // world_size
    return rank * per_rank, (rank + 1) * per_rank


class BatchSampler:
    """Shuffled training batches, defined by the global sample index.

    The tokens are cut into ``n = (len(tokens) - 1) // seq_len`` non-overlapping windows of
    ``seq_len + 1`` tokens (window ``j`` starts at ``j * seq_len``). Epoch ``e`` visits them in
    the order ``randperm(n)`` drawn from ``torch.Generator().manual_seed(seed + e)``; global sample
    ``g`` is position ``g % n`` of epoch ``g // n``. Step ``s`` is global samples
    ``[s*G, (s+1)*G)`` and rank ``r`` takes the contiguous slice ``[r*G/W, (r+1)*G/W)`` of it,
    so the global batch is the same for every world size.
    """

    def __init__(
        self,
        shard: TokenShard,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or global_batch_size < 1:
            raise RunError(
                f"seq_len ({seq_len}) and batch size ({global_batch_size}) must be positive"
            )
        self.shard = shard
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._start, self._stop = _rank_slice(
            global_batch_size, rank, world_size, "global batch size"
        )
        self._n = max(len(shard) - 1, 0) // seq_len
        if self._n == 0:
            raise RunError(
                f"{len(shard)} tokens are too few for one training window of seq_len + 1 = {seq_len + 1} tokens",
                path=shard.path,
            )
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def num_windows(self) -> int:
        """The number of windows in one epoch."""
        return self._n

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self._n, generator=gen)
            # a batch spans at most two epochs, so two cached permutations suffice
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def window_starts(self, step: int) -> list[int]:
        """Token offsets of this rank's windows at ``step``, in batch order."""
        base = step * self.global_batch_size
        starts = []
        for g in range(base + self._start, base + self._stop):
            epoch, pos = divmod(g, self._n)
            starts.append(int(self._perm(epoch)[pos]) * self.seq_len)
        return starts

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(input_ids, labels)`` at ``step``: int64, shape ``(G/W, seq_len)``;
        labels are -100 where the shard's loss mask (if any) says the target is not one.
        """
        return _gather(
            self.shard.tokens, self.window_starts(step), self.seq_len, self.shard.mask
        )


def _gather(
    tokens: torch.Tensor,
    starts: list[int],
    seq_len: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.stack([tokens[s : s + seq_len + 1].long() for s in starts])
    inputs, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if mask is not None:
        # the mask of a label is the mask of the token it targets: positions 1..seq_len
        targets = torch.stack([mask[s + 1 : s + seq_len + 1] for s in starts]).bool()
        labels = labels.masked_fill(~targets, IGNORE_INDEX)
    return inputs, labels


def num_eval_batches(
    shard: TokenShard, *, seq_len: int, batch_size: int, max_batches: int | None
) -> int:
    """How many batches :func:`eval_batches` yields: full batches only, at most ``max_batches``.

    A split with no complete window gives 0; a non-empty split with fewer windows than one batch
    is a RunError naming the path, so a trainer can check at start-up rather than at its first eval.
    """
    n = max(len(shard) - 1, 0) // seq_len
    if n == 0:
        return 0
    if n < batch_size:
        raise RunError(
            f"{n} windows of seq_len + 1 = {seq_len + 1} tokens, fewer than one eval batch of {batch_size} "
            f"(it needs {batch_size * (seq_len + 1):,} tokens): hold out more with `fgc data --val-fraction`, "
            "or train without evaluation (--eval-every 0)",
            path=shard.path,
        )
    full = n // batch_size
    return full if max_batches is None else min(full, max_batches)


def eval_batches(
    shard: TokenShard,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's ``(input_ids, labels)`` of in-order, unshuffled windows of ``shard``
    (labels -100 where its loss mask, if any, is 0).

    Batch ``b`` is windows ``[b*B, (b+1)*B)`` (``B = batch_size``, global); rank ``r`` takes the
    slice ``[r*B/W, (r+1)*B/W)``. Only full batches are yielded, so every rank yields the same
    number; ``max_batches=None`` means all of them. Arguments are checked before the first batch.
    """
    start, stop = _rank_slice(batch_size, rank, world_size, "eval batch size")
    count = num_eval_batches(
        shard, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches
    )
    return _eval_iter(shard.tokens, seq_len, batch_size, count, start, stop, shard.mask)


def _eval_iter(tokens, seq_len, batch_size, count, start, stop, mask=None):
    for b in range(count):
        first = b * batch_size
        yield _gather(
            tokens, [(first + i) * seq_len for i in range(start, stop)], seq_len, mask
        )


class ByteTokenizer:
    """The built-in tokenizer: ids 0..255 are the bytes of UTF-8 text, 256 is end-of-document."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids (no eos appended)."""
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Text of ``ids``, skipping eos; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(i for i in ids if i != self.eos_id)
        return data.decode("utf-8", errors="replace")


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """For packed sequences ``(B, T)``: the index of the document each token belongs to, counting
    from 0 in each row; an ``eos_id`` token ends (and belongs to) its document."""
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


class DocumentMasking(torch.nn.Module):
    """MODEL with attention kept inside each document of a packed sequence: ``forward(input_ids)``
    calls ``model(input_ids, document_ids)`` (the component library's ``CausalLM`` then masks
    attention block-diagonally and restarts positions at each document). Wrap it in DDP, not the
    other way round; MODEL's parameter names do not change."""

    def __init__(self, model: torch.nn.Module, eos_id: int):
        super().__init__()
        self.model = model
        self.eos_id = int(eos_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, document_ids(input_ids, self.eos_id))
