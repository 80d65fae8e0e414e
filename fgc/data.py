"""Build-time tokenisation: text files into token shards (``fgc data``; CONTRACT §5).

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
import re
import shutil
from pathlib import Path

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
        return [
            e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ]

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


def tokenize_to_shards(
    inputs, out_dir, tokenizer: str = "byte", val_fraction: float = 0.0
) -> dict:
    """Tokenize the text files named by ``inputs`` into a token-shard directory ``out_dir``.

    ``tokenizer`` is ``byte`` (built in), a ``tokenizer.json`` file or a local Hugging Face
    tokenizer directory (see :func:`load_tokenizer`); a Hugging Face one is saved into
    ``out_dir`` as ``tokenizer.json``. The last ``val_fraction`` of the documents (in file
    order) form the validation split. Returns the meta dict plus ``train_tokens``,
    ``val_tokens``, ``train_documents``, ``val_documents`` and ``files``.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not 0 <= val_fraction < 1:
        raise FgcError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(str(tokenizer))
    files = collect_text_files([str(i) for i in inputs])
    texts = [doc for path in files for doc in documents_from_file(path)]
    if isinstance(tok, HFTokenizer):
        documents = tok.encode_all(texts)
    else:
        documents = [tok.encode(doc) for doc in texts]
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
        if isinstance(tok, HFTokenizer):
            # before meta.json, which write_token_shards writes last and which names it
            out.mkdir(parents=True, exist_ok=True)
            tok.save(out)
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
