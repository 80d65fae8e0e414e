"""Build-time tokenisation: text files into token shards (``fgc data``; CONTRACT §5).

Inputs are files or directories; a directory contributes its ``*.txt``, ``*.md`` and ``*.text``
files (recursively, sorted, skipping hidden files and directories). A document is a block of
text separated from the next by one or more blank lines. The token format itself lives in
``fgc_runtime.data`` so that the writer and the generated trainers' reader cannot disagree.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from fgc.errors import FgcError, Location
from fgc_runtime.data import ByteTokenizer, write_token_shards

TEXT_SUFFIXES = (".txt", ".md", ".text")


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


def tokenize_to_shards(
    inputs, out_dir, tokenizer: str = "byte", val_fraction: float = 0.0
) -> dict:
    """Tokenize the text files named by ``inputs`` into a token-shard directory ``out_dir``.

    Only the built-in ``byte`` tokenizer exists in this version. The last ``val_fraction`` of the
    documents (in file order) form the validation split. Returns the meta dict plus
    ``train_tokens``, ``val_tokens``, ``train_documents``, ``val_documents`` and ``files``.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if tokenizer != "byte":
        raise FgcError(
            f"unsupported tokenizer {tokenizer!r}: only the built-in `byte` tokenizer is supported "
            "in this version of fgc (Hugging Face tokenizer.json / directory support is not implemented yet)",
            hint="use --tokenizer byte",
        )
    if not 0 <= val_fraction < 1:
        raise FgcError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = collect_text_files([str(i) for i in inputs])
    tok = ByteTokenizer()
    documents = [tok.encode(doc) for path in files for doc in documents_from_file(path)]
    if not documents:
        raise FgcError(
            "the input files hold no text",
            loc=Location(file=str(files[0])) if len(files) == 1 else None,
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FgcError(
            "output exists and is not a directory", loc=Location(file=str(out_dir))
        )
    try:
        result = write_token_shards(
            out,
            documents,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            tokenizer=tok.name,
            val_fraction=val_fraction,
        )
    except OSError as err:
        raise FgcError(
            f"cannot write token shards: {err.strerror or err}",
            loc=Location(file=str(out_dir)),
        ) from None
    result["files"] = len(files)
    return result
