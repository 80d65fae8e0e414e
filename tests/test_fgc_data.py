"""`fgc data`: text files into token shards, with the byte tokenizer or a Hugging Face one (a
tiny BPE trained here with the `tokenizers` package)."""

import json
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import run_fgc
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


def test_missing_tokenizer_path(tmp_path):
    make_corpus(tmp_path / "corpus")
    with pytest.raises(FgcError) as info:
        tokenize_to_shards(
            [str(tmp_path / "corpus")],
            tmp_path / "out",
            tokenizer="gpt2/tokenizer.json",
        )
    assert str(info.value).startswith(
        "gpt2/tokenizer.json: error: no such tokenizer file or directory"
    )
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


# --- Hugging Face tokenizers ---------------------------------------------------------------------


def train_bpe(special_tokens=("<|endoftext|>",), vocab_size=300) -> Tokenizer:
    """A byte-level BPE trained on a few sentences (the test's own: no downloads)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, tokenizers"]
    tok.train_from_iterator(text * 50, trainer)
    return tok


def test_tokenizer_json_file(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    tok = train_bpe()
    tok.save(str(tmp_path / "bpe.json"))
    proc = run_fgc(
        "data",
        tmp_path / "corpus",
        "-o",
        tmp_path / "shards",
        "--tokenizer",
        tmp_path / "bpe.json",
        "--val-fraction",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(tokenizer.json tokenizer, vocab 300)" in proc.stderr
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta == {
        "format": "fgc-tokens",
        "version": 1,
        "vocab_size": 300,
        "dtype": "uint16",
        "eos_id": tok.token_to_id("<|endoftext|>"),
        "tokenizer": "tokenizer.json",
    }
    assert meta["eos_id"] == 0
    # the tokenizer file itself, byte for byte, next to the shards
    copied = (tmp_path / "shards" / "tokenizer.json").read_bytes()
    assert copied == (tmp_path / "bpe.json").read_bytes()
    expected = [tok.encode(d, add_special_tokens=False).ids + [0] for d in docs]
    train = TokenShard.open(tmp_path / "shards", "train").tokens.tolist()
    val = TokenShard.open(tmp_path / "shards", "val").tokens.tolist()
    assert train == sum(expected[:4], []) and val == expected[4]
    # BPE merges: fewer tokens than bytes
    assert len(train) + len(val) < sum(len(d.encode()) + 1 for d in docs)
    assert (
        Tokenizer.from_file(str(tmp_path / "shards" / "tokenizer.json")).decode(
            expected[4][:-1]
        )
        == docs[4]
    )


def test_tokenizer_directory_eos_from_tokenizer_config(tmp_path):
    make_corpus(tmp_path / "corpus")
    tok = train_bpe(special_tokens=("</s>", "<|endoftext|>"))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    info = tokenize_to_shards([str(tmp_path / "corpus")], tmp_path / "shards", tok_dir)
    # the config's eos_token wins over "</s>", the first of the names looked for
    assert info["eos_id"] == tok.token_to_id("<|endoftext|>") == 1
    assert (
        json.loads((tmp_path / "shards" / "tokenizer_config.json").read_text())
        == config
    )
    tokens = TokenShard.open(tmp_path / "shards").tokens.tolist()
    assert tokens.count(1) == 5 and 0 not in tokens  # five documents, "</s>" never used
    # without the config, "</s>" is found by name
    (tok_dir / "tokenizer_config.json").unlink()
    info = tokenize_to_shards([str(tmp_path / "corpus")], tmp_path / "shards2", tok_dir)
    assert info["eos_id"] == tok.token_to_id("</s>") == 0


def test_tokenizer_directory_without_tokenizer_json_uses_autotokenizer(tmp_path):
    """GPT-2 style files (vocab.json, merges.txt): transformers' AutoTokenizer converts them,
    and the shards get the same tokens as from the tokenizer.json."""
    make_corpus(tmp_path / "corpus")
    tok = train_bpe()
    tok.save(str(tmp_path / "bpe.json"))
    tok_dir = tmp_path / "gpt2style"
    tok_dir.mkdir()
    tok.model.save(str(tok_dir))  # vocab.json and merges.txt
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    a = tokenize_to_shards(
        [str(tmp_path / "corpus")], tmp_path / "a", tmp_path / "bpe.json"
    )
    b = tokenize_to_shards([str(tmp_path / "corpus")], tmp_path / "b", tok_dir)
    assert (a["vocab_size"], a["eos_id"]) == (b["vocab_size"], b["eos_id"]) == (300, 0)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (
        tmp_path / "b" / "train.bin"
    ).read_bytes()
    saved = Tokenizer.from_file(str(tmp_path / "b" / "tokenizer.json"))
    assert saved.encode("hello world").ids == tok.encode("hello world").ids


def test_large_vocabulary_uses_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<eos>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "c.txt").write_text("w69999 w3 w65536\n\nw1\n")
    info = tokenize_to_shards(
        [str(tmp_path / "c.txt")], tmp_path / "s", tmp_path / "big.json"
    )
    assert (info["vocab_size"], info["eos_id"], info["dtype"]) == (
        70001,
        70000,
        "uint32",
    )
    shard = TokenShard.open(tmp_path / "s")
    assert shard.tokens.long().tolist() == [69999, 3, 65536, 70000, 1, 70000]


def test_tokenizer_errors_name_the_path(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("some text\n")
    (tmp_path / "broken.json").write_text("{not json")
    proc = run_fgc(
        "data",
        tmp_path / "c.txt",
        "-o",
        tmp_path / "s",
        "--tokenizer",
        tmp_path / "broken.json",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        f"{display_path(str(tmp_path / 'broken.json'))}: error: not a tokenizer.json"
    )
    assert not (tmp_path / "s").exists()
    # no end-of-text token under any of the names looked for
    train_bpe(special_tokens=("<pad>",)).save(str(tmp_path / "noeos.json"))
    with pytest.raises(FgcError) as info:
        tokenize_to_shards(
            [str(tmp_path / "c.txt")], tmp_path / "s", tmp_path / "noeos.json"
        )
    assert "no end-of-text token" in str(info.value) and "noeos.json" in str(info.value)
    # an eos_token that the vocabulary lacks
    (tmp_path / "d").mkdir()
    train_bpe().save(str(tmp_path / "d" / "tokenizer.json"))
    (tmp_path / "d" / "tokenizer_config.json").write_text('{"eos_token": "</eos>"}')
    with pytest.raises(
        FgcError, match="eos_token '</eos>' is not in the tokenizer's vocabulary"
    ):
        tokenize_to_shards([str(tmp_path / "c.txt")], tmp_path / "s", tmp_path / "d")
    # the tokenizers package missing
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(FgcError) as info:
        tokenize_to_shards([str(tmp_path / "c.txt")], tmp_path / "s", tmp_path / "d")
    assert "needs the `tokenizers` package" in str(info.value)
    assert str(info.value).startswith(f"{display_path(str(tmp_path / 'd'))}: error:")


@pytest.mark.slow
def test_bpe_tokenizer_through_fgc_data_training_and_sampling(tmp_path):
    """A BPE trained here tokenizes a corpus of two repeated sentences; a tiny model trained on
    the shards continues the prompt "the" with the sentence, decoded by the same tokenizer.
    """
    import subprocess

    train_bpe().save(str(tmp_path / "bpe.json"))
    sentences = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, tokenizers",
    ]
    (tmp_path / "corpus.txt").write_text("\n\n".join(sentences * 40) + "\n")
    proc = run_fgc(
        "data",
        tmp_path / "corpus.txt",
        "-o",
        tmp_path / "shards",
        "--tokenizer",
        tmp_path / "bpe.json",
        "--val-fraction",
        "0.1",
    )
    assert proc.returncode == 0, proc.stderr
    defines = {
        "data_dir": tmp_path / "shards",
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 40,
        "lr": 0.01,
        "sample_every": 40,
        "sample_prompt": "the",
        "log_every": 1,
    }
    args = [a for k, v in defines.items() for a in ("-D", f"{k}={v}")]
    proc = run_fgc(
        "build", "fgc/templates/lm/train.yaml", "-o", tmp_path / "pkg", *args
    )
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "pkg" / "train.py"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    metrics = [
        json.loads(line)
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[0] > 5.0 and losses[-1] < 1.0  # ln(300) = 5.7 at the start
    [sample] = [
        json.loads(line)
        for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    ]
    assert sample["step"] == 40 and sample["prompt"] == "the"
    # greedy decoding of the memorised sentence, through the BPE's decoder
    assert sample["text"].startswith(" quick brown fox jumps over")
