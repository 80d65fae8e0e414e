"""`fgc data`: text files into token shards."""

import pytest

from fgc.data import collect_text_files, documents_from_file, tokenize_to_shards
from fgc.errors import FgcError, display_path
from fgc_runtime.data import ByteTokenizer, TokenShard


def make_corpus(root):
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(
        "First doc, line one.\nline two.\n\n\n  Second doc.  \n", encoding="utf-8"
    )
    (root / "b" / "c.md").write_text(
        "# Heading\n\nÜnïcödé text ✓\n \t\nlast one\n", encoding="utf-8"
    )
    (root / "b" / "skip.json").write_text("{}")
    (root / ".hidden.txt").write_text("hidden")
    return [
        "First doc, line one.\nline two.",
        "Second doc.",
        "# Heading",
        "Ünïcödé text ✓",
        "last one",
    ]


def test_collect_and_documents(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    files = collect_text_files([str(tmp_path / "corpus")])
    assert [p.relative_to(tmp_path / "corpus").as_posix() for p in files] == [
        "a.txt",
        "b/c.md",
    ]
    assert documents_from_file(files[0]) + documents_from_file(files[1]) == docs
    # a file given explicitly is used whatever its suffix
    assert collect_text_files([str(tmp_path / "corpus" / "b" / "skip.json")]) == [
        tmp_path / "corpus" / "b" / "skip.json"
    ]


def test_tokenize_round_trip(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    info = tokenize_to_shards([str(tmp_path / "corpus")], out, val_fraction=0.2)
    assert info["format"] == "fgc-tokens" and info["version"] == 1
    assert (info["vocab_size"], info["eos_id"], info["dtype"], info["tokenizer"]) == (
        257,
        256,
        "uint16",
        "byte",
    )
    assert (info["train_documents"], info["val_documents"], info["files"]) == (4, 1, 2)
    tok = ByteTokenizer()
    train = TokenShard.open(out, "train")
    val = TokenShard.open(out, "val")
    expected_train = sum(len(d.encode("utf-8")) + 1 for d in docs[:4])
    assert len(train) == info["train_tokens"] == expected_train
    assert len(val) == info["val_tokens"] == len(b"last one") + 1
    assert train.tokens.long().tolist().count(256) == 4
    assert tok.decode(train.tokens) == "".join(docs[:4])
    # documents are separated by eos: splitting on it gives them back
    ids = train.tokens.long().tolist()
    pieces, cur = [], []
    for i in ids:
        if i == 256:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert pieces == docs[:4]
    assert tok.decode(val.tokens) == "last one"


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FgcError) as info:
        tokenize_to_shards([str(missing)], tmp_path / "out")
    assert (
        str(info.value)
        == f"{display_path(str(missing))}: error: no such file or directory"
    )
    assert not (tmp_path / "out").exists()


def test_non_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo".encode("utf-8") + b" \xff tail")
    with pytest.raises(FgcError) as info:
        collect_text_files([str(tmp_path)])
    assert str(info.value).startswith(
        f"{display_path(str(bad))}: error: not valid UTF-8 text: invalid byte at offset 7"
    )


def test_non_utf8_across_chunk_boundary(tmp_path):
    # a truncated 2-byte sequence straddling the 1 MiB read boundary
    bad = tmp_path / "big.txt"
    bad.write_bytes(b"a" * ((1 << 20) - 1) + b"\xc3" + b"a")
    with pytest.raises(FgcError, match=f"offset {(1 << 20) - 1}"):
        collect_text_files([str(bad)])


def test_unsupported_tokenizer(tmp_path):
    make_corpus(tmp_path / "corpus")
    with pytest.raises(FgcError) as info:
        tokenize_to_shards(
            [str(tmp_path / "corpus")],
            tmp_path / "out",
            tokenizer="gpt2/tokenizer.json",
        )
    assert "only the built-in `byte` tokenizer is supported" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_val_fraction_and_empty_dir(tmp_path):
    make_corpus(tmp_path / "corpus")
    with pytest.raises(FgcError, match=r"--val-fraction must be in \[0, 1\)"):
        tokenize_to_shards(
            [str(tmp_path / "corpus")], tmp_path / "out", val_fraction=1.0
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FgcError) as info:
        collect_text_files([str(tmp_path / "empty")])
    assert str(info.value).startswith(
        f"{display_path(str(tmp_path / 'empty'))}: error: no text files"
    )
