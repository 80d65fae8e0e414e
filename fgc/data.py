"""Build-time tokenisation: text files into token shards (``fgc data``; docs/package.md, token shards).

Inputs are files or directories; a directory contributes its ``*.txt``, ``*.md`` and ``*.text``
files (recursively, sorted, skipping hidden files and directories). A document is a block of
text separated from the next by one or more blank lines. The token format itself lives in
``fgc_runtime.data`` so that the writer and the generated trainers' reader cannot disagree.

The tokenizer is the built-in ``byte`` one, or a Hugging Face tokenizer: a ``tokenizer.json``
file, or a local tokenizer directory (with a ``tokenizer.json``, read with the ``tokenizers``
package; without one, loaded with transformers' ``AutoTokenizer``). Such a tokenizer is saved
as ``tokenizer.json`` in the shard directory (with the directory's ``tokenizer_config.json``,
``special_tokens_map.json`` and ``tokenizer.model``, when it has them) and ``meta.json`` says
``"tokenizer": "tokenizer.json"``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from fgc.errors import FgcError, Location
from fgc_runtime.data import ByteTokenizer, write_token_shards

TEXT_SUFFIXES = (".txt", ".md", ".text")
# End-of-text tokens looked for, in this order, when the tokenizer's files name none.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
# Files of a tokenizer directory copied next to the shards, besides tokenizer.json.
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


def _check_utf8(path: Path) -> None:
    """FgcError naming ``path`` and the byte offset of the first invalid UTF-8 byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start is relative to the bytes the decoder held: buffered ones plus this chunk
                buffered = len(err.object) - len(chunk)
                raise FgcError(
                    f"not valid UTF-8 text: invalid byte at offset {offset - buffered + err.start}",
                    loc=Location(file=str(path)),
                    hint="convert the file to UTF-8 (e.g. with iconv)",
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _expand_dir(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .git, editor swap files and the like
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            found.append(path)
    # sort by the relative posix path so that the order is the same on every machine
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def collect_text_files(inputs: list[str]) -> list[Path]:
    """The text files named by ``inputs``: files as given, directories expanded.

    A missing input, no text file at all, or a file that is not UTF-8 (its byte offset named)
    is an FgcError.
    """
    if not inputs:
        raise FgcError("no input files given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FgcError("no such file or directory", loc=Location(file=str(item)))
        if path.is_dir():
            expanded = _expand_dir(path)
            if not expanded:
                raise FgcError(
                    f"no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)}) in this directory",
                    loc=Location(file=str(item)),
                )
            files.extend(expanded)
        else:
            files.append(path)
    for path in files:
        _check_utf8(path)
    return files


def documents_from_file(path) -> list[str]:
    """The documents of a text file: blocks separated by blank lines, stripped, empty ones dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # universal newlines: \r\n reads as \n
    except UnicodeDecodeError as err:
        raise FgcError(
            f"not valid UTF-8 text: invalid byte at offset {err.start}",
            loc=Location(file=str(path)),
        ) from None
    blocks = re.split(r"\n[^\S\n]*\n\s*", text)
    return [block.strip() for block in blocks if block.strip()]


class HFTokenizer:
    """A Hugging Face tokenizer (a ``tokenizers.Tokenizer``) with what ``fgc data`` needs.

    ``vocab_size`` is the largest id (added tokens included) plus one; ``eos_id`` the id of the
    end-of-text token that separates documents in the shards. Documents are encoded without
    special tokens (no BOS): the shards hold the text's tokens, each document followed by eos.
    """

    name = "tokenizer.json"

    def __init__(self, tokenizer, eos_token: str, source: Path, side_files: list[Path]):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_id = tokenizer.token_to_id(eos_token)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.source = source
        self.side_files = side_files

    def encode_all(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, encoded in parallel threads on every core (the tokenizers
        library's batch encoding; its ``_fast`` form skips the offsets, which text needs not).
        """
        encode = getattr(
            self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch
        )
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def save(self, out_dir: Path) -> None:
        """Write ``tokenizer.json`` (a byte copy of the source file when there is one) and the side files."""
        if self.source.is_file():
            _copy(self.source, out_dir / "tokenizer.json")
        else:
            self.tokenizer.save(str(out_dir / "tokenizer.json"))
        for path in self.side_files:
            _copy(path, out_dir / path.name)


def _copy(source: Path, target: Path) -> None:
    """Copy a file's bytes, unless TARGET already is SOURCE (a tokenizer taken from the output directory)."""
    if target.exists() and target.samefile(source):
        return
    shutil.copyfile(source, target)


def _eos_from_files(directory: Path) -> str | None:
    """The ``eos_token`` that a tokenizer directory's tokenizer_config.json or special_tokens_map.json names."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise FgcError(
                f"not valid JSON: {err}", loc=Location(file=str(path))
            ) from None
        eos = data.get("eos_token") if isinstance(data, dict) else None
        if isinstance(eos, dict):  # an AddedToken: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def load_tokenizer(spec: str):
    """The tokenizer ``--tokenizer SPEC`` names: ``byte``, a tokenizer.json or a tokenizer directory.

    Every problem (no such path, a file that does not parse, a package that is missing, no
    end-of-text token) is an FgcError naming the path.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    loc = Location(file=str(spec))
    if not path.exists():
        raise FgcError(
            "no such tokenizer file or directory",
            loc=loc,
            hint="--tokenizer takes byte, a tokenizer.json file or a local Hugging Face tokenizer directory "
            "(fgc downloads nothing)",
        )
    directory = path if path.is_dir() else None
    file = path if directory is None else path / "tokenizer.json"
    if file.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise FgcError(
                "reading a tokenizer.json needs the `tokenizers` package",
                loc=loc,
                hint="pip install tokenizers",
            ) from None
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises its own exception types
            raise FgcError(
                f"not a tokenizer.json that the tokenizers package can read: {err}",
                loc=Location(file=str(file)),
            ) from None
        eos = _eos_from_files(directory) if directory is not None else None
    else:
        tokenizer, eos = _auto_tokenizer(directory, loc)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if eos is None:
        eos = next((token for token in EOS_CANDIDATES if token in vocab), None)
        if eos is None:
            raise FgcError(
                "the tokenizer has no end-of-text token to separate documents (looked for "
                + ", ".join(EOS_CANDIDATES)
                + (
                    " and for eos_token in tokenizer_config.json"
                    if directory is not None
                    else ""
                )
                + ")",
                loc=loc,
                hint="use a tokenizer directory whose tokenizer_config.json names its eos_token",
            )
    elif eos not in vocab:
        raise FgcError(
            f"the eos_token {eos!r} is not in the tokenizer's vocabulary", loc=loc
        )
    side_files = [
        directory / n
        for n in TOKENIZER_SIDE_FILES
        if directory is not None and (directory / n).is_file()
    ]
    return HFTokenizer(tokenizer, eos, file if file.is_file() else path, side_files)


def _auto_tokenizer(directory: Path, loc: Location):
    """A tokenizer directory without tokenizer.json, through transformers' AutoTokenizer (local files only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FgcError(
            "this tokenizer directory has no tokenizer.json; loading it needs the `transformers` package",
            loc=loc,
            hint="pip install transformers, or give a directory with a tokenizer.json",
        ) from None
    try:
        auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (
        Exception
    ) as err:  # transformers raises many exception types for unreadable directories
        message = (
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        )
        raise FgcError(
            f"transformers' AutoTokenizer cannot load this directory: {message}",
            loc=loc,
        ) from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise FgcError(
            f"transformers loads this directory as {type(auto).__name__}, which has no tokenizer.json form",
            loc=loc,
            hint="give a directory with a tokenizer.json (a fast tokenizer)",
        )
    return backend, auto.eos_token


# --- inputs: text files and datasets ------------------------------------------------------------

FORMATS = ("text", "chat")
# file kinds read through the `datasets` library, by suffix: the name of its builder
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# files that are neither text nor a dataset kind fgc reads
UNREADABLE_SUFFIXES = (
    ".csv",
    ".tsv",
    ".arrow",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
    ".tar",
    ".pdf",
    ".xlsx",
)
KINDS_HINT = ".jsonl, .json, .parquet or a datasets directory saved with save_to_disk"
BATCH = 512  # records rendered and encoded together


class Source:
    """One input: PATH read as KIND (``text``, ``json``, ``parquet`` or ``disk``)."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self.dataset = None  # the opened datasets.Dataset

    @property
    def loc(self) -> Location:
        return Location(file=str(self.path))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def collect_sources(inputs: list[str], fmt: str) -> list[Source]:
    """The inputs as sources, in order: files by their suffix, a ``save_to_disk`` directory as a
    dataset, any other directory expanded (text mode: its text files as today; chat mode: its
    ``.jsonl``/``.json``/``.parquet`` files). A missing input, a file kind fgc cannot read (or,
    in chat mode, a plain text file) and a text file that is not UTF-8 are FgcErrors."""
    if not inputs:
        raise FgcError("no input files given")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        loc = Location(file=str(item))
        if not path.exists():
            raise FgcError("no such file or directory", loc=loc)
        if path.is_dir():
            if _is_saved_dataset(path):
                sources.append(Source(path, "disk"))
            elif fmt == "text":
                sources.extend(Source(p, "text") for p in collect_text_files([item]))
            else:
                found = sorted(
                    (
                        p
                        for p in path.rglob("*")
                        if p.suffix in DATASET_SUFFIXES
                        and p.is_file()
                        and not any(
                            part.startswith(".") for part in p.relative_to(path).parts
                        )
                    ),
                    key=lambda p: p.relative_to(path).as_posix(),
                )
                if not found:
                    raise FgcError(
                        "no conversation files (*.jsonl, *.json, *.parquet) in this directory",
                        loc=loc,
                    )
                sources.extend(Source(p, DATASET_SUFFIXES[p.suffix]) for p in found)
            continue
        suffix = path.suffix.lower()
        if suffix in DATASET_SUFFIXES:
            sources.append(Source(path, DATASET_SUFFIXES[suffix]))
        elif suffix in UNREADABLE_SUFFIXES or fmt == "chat":
            expected = (
                KINDS_HINT
                if fmt == "chat"
                else KINDS_HINT + ", or text (.txt, .md, .text)"
            )
            raise FgcError(
                f"cannot read {'conversations from ' if fmt == 'chat' else ''}this kind of file "
                f"(expected {expected})",
                loc=loc,
            )
        else:
            _check_utf8(path)  # a text file, whatever its suffix, as before
            sources.append(Source(path, "text"))
    return sources


def _open_dataset(source: Source, cache_dir: str):
    """Open a dataset source (memory-mapped Arrow: its rows are read in batches, never all at
    once); every failure is an FgcError naming the path. Imported here: text files never
    need ``datasets`` (about a second to import)."""
    import datasets

    datasets.disable_progress_bars()
    # fgc reports a bad file itself, in one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(str(source.path))
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                if "train" not in ds and len(splits) != 1:
                    raise FgcError(
                        f"a dataset with several splits ({', '.join(splits)}) and none named train",
                        loc=source.loc,
                    )
                ds = ds["train"] if "train" in ds else ds[splits[0]]
        else:
            # each file on its own, so that errors can name the file and its record
            ds = datasets.load_dataset(
                source.kind,
                data_files=str(source.path),
                split="train",
                cache_dir=cache_dir,
            )
    except FgcError:
        raise
    # datasets and pyarrow raise many exception types for bad files
    except Exception as err:
        if source.kind == "json" and _empty_json(source.path):
            source.dataset = []  # no records (datasets refuses to load an empty file)
            return source.dataset
        # "An error occurred while generating the dataset" wraps the reason
        while err.__cause__ is not None:
            err = err.__cause__
        text = str(err).strip()
        message = text.splitlines()[0] if text else type(err).__name__
        raise FgcError(
            f"cannot read this file as {source.kind}: {message}", loc=source.loc
        ) from None
    source.dataset = ds
    return ds


def _empty_json(path: Path) -> bool:
    """Whether a JSON or JSONL file holds no record: only white space, or an empty list."""
    if path.stat().st_size > 1 << 16:
        return False
    text = path.read_bytes().strip()
    return text in (b"", b"[]")


def _rows(source: Source, columns: list[str]) -> Iterator[list[dict]]:
    """The records of a dataset source in batches of BATCH, each a dict of the COLUMNS it has."""
    ds = source.dataset
    if not len(ds):
        return
    present = [c for c in columns if c in ds.column_names]
    if not present:
        if len(ds):
            yield [{}]  # the first record lacks every field: reported by the caller
        return
    for batch in ds.select_columns(present).iter(batch_size=BATCH):
        values = [batch[c] for c in present]
        yield [dict(zip(present, row)) for row in zip(*values)]


def _other_format_hint(source: Source, fmt: str) -> str | None:
    """A hint to use ``--format FMT`` when SOURCE has that format's fields instead."""
    columns = getattr(source.dataset, "column_names", [])
    fields = ("messages", "conversations") if fmt == "chat" else ("text",)
    if any(field in columns for field in fields):
        return f"this file has {' or '.join(repr(f) for f in fields if f in columns)} fields: use --format {fmt}"
    return None


def _progress(total: int):
    """A progress bar over TOTAL records on stderr, shown only on a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=" records",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def _text_documents(sources: list[Source], tok, bar) -> Iterator[list[int]]:
    """Token ids of every text document: blocks of text files, ``text`` fields of records.
    A Hugging Face tokenizer encodes a batch at a time on all cores (the tokenizers library's
    encode_batch runs in parallel threads)."""

    def encode(texts):
        if isinstance(tok, HFTokenizer):
            return tok.encode_all(texts)
        return [tok.encode(t) for t in texts]

    for source in sources:
        if source.kind == "text":
            texts = documents_from_file(source.path)
            for start in range(0, len(texts), BATCH):
                yield from encode(texts[start : start + BATCH])
                bar.update(len(texts[start : start + BATCH]))
            continue
        number = 0
        for rows in _rows(source, ["text"]):
            texts = []
            for row in rows:
                number += 1
                text = row.get("text")
                if text is None:
                    raise FgcError(
                        f'record {number}: no "text" field',
                        loc=source.loc,
                        hint=_other_format_hint(source, "chat"),
                    )
                if not isinstance(text, str):
                    raise FgcError(
                        f'record {number}: "text" must be a string, got {type(text).__name__}',
                        loc=source.loc,
                    )
                texts.append(text)
            yield from encode(texts)
            bar.update(len(texts))


def _chat_documents(
    sources: list[Source], encoder, pool, stats: dict, bar
) -> Iterator[tuple[list[int], bytes]]:
    """``(ids, mask)`` of every conversation, in order. With POOL, batches are rendered and encoded
    in worker processes (a bounded number in flight, so memory stays flat)."""
    from collections import deque

    from fgc.chat import RecordError, conversation

    def results(source, numbers, outcome):
        if outcome[0] == "error":
            _, index, message = outcome
            raise FgcError(f"record {numbers[index]}: {message}", loc=source.loc)
        for ids, mask, ender in outcome[1]:
            if ender is not None:
                stats["turn_end_ids"].add(ender)
            stats["targets"] += sum(mask)
            yield ids, mask
        bar.update(len(numbers))

    def encode_here(conversations):
        try:
            return ("ok", encoder.encode(conversations))
        except RecordError as err:
            return ("error", getattr(err, "index", 0), str(err))

    pending: deque = deque()
    for source in sources:
        number = 0
        for rows in _rows(source, ["messages", "conversations"]):
            numbers, conversations = [], []
            for row in rows:
                number += 1
                try:
                    conversations.append(conversation(row))
                except RecordError as err:
                    # the records before it come first: one of them may fail to render
                    while pending:
                        source_, numbers_, job = pending.popleft()
                        yield from results(source_, numbers_, job.get())
                    yield from results(source, numbers, encode_here(conversations))
                    raise FgcError(
                        f"record {number}: {err}",
                        loc=source.loc,
                        hint=(
                            None
                            if row.get("messages") or row.get("conversations")
                            else _other_format_hint(source, "text")
                        ),
                    ) from None
                numbers.append(number)
            if pool is None:
                yield from results(source, numbers, encode_here(conversations))
                continue
            from fgc.chat import worker_encode

            pending.append(
                (source, numbers, pool.apply_async(worker_encode, (conversations,)))
            )
            while len(pending) > 2 * pool._processes:
                source_, numbers_, job = pending.popleft()
                yield from results(source_, numbers_, job.get())
    while pending:
        source_, numbers_, job = pending.popleft()
        yield from results(source_, numbers_, job.get())


def _prepare_chat(
    tok, directory: Path | None, tokenizer_spec: str, option: str | None, stage: Path
):
    """Install the chat template (and its tokens) on a copy of the tokenizer in STAGE; return the
    ChatEncoder, the tokens added, the template and the separator id."""
    from tokenizers import Tokenizer

    from fgc.chat import (
        ChatEncoder,
        add_template_tokens,
        read_config,
        resolve_template,
        write_chat_tokenizer,
    )

    template, installed = resolve_template(option, directory, tokenizer_spec)
    grown = Tokenizer.from_str(tok.tokenizer.to_str())
    added = add_template_tokens(grown, template) if installed else []
    config = read_config(directory)
    write_chat_tokenizer(grown, config, tok.eos_token, template, stage)
    # special_tokens_map.json names the special tokens for older transformers; tokenizer.model is
    # left behind: it lacks any token added here, and tokenizer.json is complete
    if directory is not None and (directory / "special_tokens_map.json").is_file():
        shutil.copyfile(
            directory / "special_tokens_map.json", stage / "special_tokens_map.json"
        )
    try:
        encoder = ChatEncoder(stage)
    except Exception as err:
        text = str(err).strip()
        raise FgcError(
            f"transformers cannot load the tokenizer with this chat template: {text.splitlines()[0] if text else type(err).__name__}",
            loc=Location(file=tokenizer_spec),
        ) from None
    vocab = grown.get_vocab(with_added_tokens=True)
    # the separator ends a conversation for document masking, so it must not occur inside one
    probe = encoder.probe_ids()
    candidates = [tok.eos_token, *EOS_CANDIDATES]
    for key in ("pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            candidates.append(value)
    separator = None
    for token in candidates:
        if token in vocab and (probe is None or vocab[token] not in probe[:-1]):
            separator = token
            break
    if separator is None:
        raise FgcError(
            f"no token can separate conversations: {tok.eos_token!r} occurs inside conversations the chat template renders",
            loc=Location(file=tokenizer_spec),
            hint="give the tokenizer an end-of-text token that the template does not use (e.g. <|endoftext|>)",
        )
    encoder.separator_id = vocab[separator]
    return encoder, added, template, separator


def _generation_eos_ids(directory: Path | None, vocab_size: int) -> set[int]:
    """The ``eos_token_id`` (one or a list) of a model directory's generation_config.json."""
    path = directory / "generation_config.json" if directory is not None else None
    if path is None or not path.is_file():
        return set()
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise FgcError(
            f"not a valid generation_config.json: {err}", loc=Location(file=str(path))
        ) from None
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return {
        i
        for i in ids
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
    }


def _workers(requested: int | None) -> int:
    if requested is not None:
        return max(1, requested)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def tokenize_to_shards(
    inputs,
    out_dir,
    tokenizer: str = "byte",
    val_fraction: float = 0.0,
    format: str = "text",
    chat_template: str | None = None,
    workers: int | None = None,
) -> dict:
    """Tokenize INPUTS into a token-shard directory ``out_dir``.

    ``format`` ``text`` (the default) reads text files (blocks separated by blank lines are
    documents) and the ``text`` field of JSONL, JSON, Parquet and ``save_to_disk`` datasets;
    ``chat`` reads conversations from the latter (``messages`` or ``conversations``) and renders
    them with the tokenizer's chat template, or the one ``chat_template`` installs (``chatml`` or
    a Jinja file), writing loss masks. ``tokenizer`` is ``byte`` (text only), a
    ``tokenizer.json`` or a local Hugging Face tokenizer directory (see :func:`load_tokenizer`);
    a Hugging Face one is saved into ``out_dir`` (in chat mode with its template). The last
    ``val_fraction`` of the documents form the validation split. Records are read in batches and
    written as they come (memory stays flat); chat conversations are rendered in ``workers``
    processes (default: one per CPU). Every user mistake is an FgcError and leaves ``out_dir``
    as it was. Returns the meta dict plus ``train_tokens``, ``val_tokens``, ``train_documents``,
    ``val_documents``, ``files`` and (chat) ``target_tokens``.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if format not in FORMATS:
        raise FgcError(f"unknown --format {format!r} (expected {' or '.join(FORMATS)})")
    if not 0 <= val_fraction < 1:
        raise FgcError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    chat = format == "chat"
    if chat_template is not None and not chat:
        raise FgcError("--chat-template needs --format chat")
    tok = load_tokenizer(str(tokenizer))
    if chat and not isinstance(tok, HFTokenizer):
        raise FgcError(
            "chat data needs a Hugging Face tokenizer",
            loc=Location(file=str(tokenizer)),
            hint="give --tokenizer a tokenizer.json or a local tokenizer directory",
        )
    sources = collect_sources([str(i) for i in inputs], format)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FgcError(
            "output exists and is not a directory", loc=Location(file=str(out_dir))
        )
    scratch = Path(tempfile.mkdtemp(prefix="fgc-data-"))
    pool = None
    try:
        count = 0
        for source in sources:
            if source.kind == "text":
                count += len(documents_from_file(source.path))
            else:
                count += len(_open_dataset(source, str(scratch / "cache")))
        if count == 0:
            raise FgcError(
                "the input files hold no " + ("conversations" if chat else "text"),
                loc=sources[0].loc if len(sources) == 1 else None,
            )
        extra: dict = {}
        stats = {"targets": 0, "turn_end_ids": set()}
        if chat:
            stage = scratch / "tokenizer"
            stage.mkdir()
            directory = Path(tokenizer) if Path(tokenizer).is_dir() else None
            encoder, added, template, separator = _prepare_chat(
                tok, directory, str(tokenizer), chat_template, stage
            )
            vocab = encoder.backend.get_vocab(with_added_tokens=True)
            vocab_size = max(vocab.values()) + 1
            eos_id = vocab[separator]
            stats["turn_end_ids"] |= encoder.turn_end_ids()
            n = _workers(workers)
            import multiprocessing

            # forked workers inherit the loaded libraries; where fork is missing, one process
            if (
                n > 1
                and count > BATCH
                and "fork" in multiprocessing.get_all_start_methods()
            ):
                from fgc.chat import worker_init

                pool = multiprocessing.get_context("fork").Pool(
                    n, worker_init, (str(stage), eos_id)
                )
            bar = _progress(count)
            documents = _chat_documents(sources, encoder, pool, stats, bar)

            def save(target: Path) -> None:
                for path in sorted(stage.iterdir()):
                    _copy(path, target / path.name)

            # a chat model directory lists its own end ids (e.g. Llama 3's three) for generation
            model_eos = _generation_eos_ids(directory, vocab_size)

            def meta() -> dict:
                ends = set(stats["turn_end_ids"]) | {tok.eos_id} | model_eos
                if separator in EOS_CANDIDATES:
                    ends.add(eos_id)
                return {
                    "chat_template": template,
                    "eos_ids": sorted(ends),
                    "added_tokens": list(added),
                }

            extra = meta
        else:
            vocab_size, eos_id = tok.vocab_size, tok.eos_id
            bar = _progress(count)
            documents = _text_documents(sources, tok, bar)
            save = tok.save if isinstance(tok, HFTokenizer) else None
        try:
            result = write_token_shards(
                out,
                documents,
                vocab_size=vocab_size,
                eos_id=eos_id,
                tokenizer=tok.name,
                val_fraction=val_fraction,
                num_documents=count,
                loss_mask=chat,
                extra_meta=extra,
                before_commit=save,
            )
        except OSError as err:
            raise FgcError(
                f"cannot write token shards: {err.strerror or err}",
                loc=Location(file=str(out_dir)),
            ) from None
        finally:
            bar.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(scratch, ignore_errors=True)
    result["files"] = len(sources)
    if chat:
        result["target_tokens"] = stats["targets"]
    return result
