"""Token shards: the on-disk format, validation errors, and the batch samplers."""

import json
import struct

import pytest
import torch

from fgc_runtime.data import (
    BatchSampler,
    ByteTokenizer,
    TokenShard,
    check_vocab,
    eval_batches,
    num_eval_batches,
    write_token_shards,
)
from fgc_runtime.errors import RunError

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def write(
    tmp_path, docs=DOCS, vocab_size=100, eos_id=0, val_fraction=0.0, name="shards"
):
    out = tmp_path / name
    info = write_token_shards(
        out,
        docs,
        vocab_size=vocab_size,
        eos_id=eos_id,
        tokenizer="test",
        val_fraction=val_fraction,
    )
    return out, info


def test_round_trip_uint16(tmp_path):
    out, info = write(tmp_path)
    shard = TokenShard.open(out)
    assert shard.tokens.dtype == torch.uint16
    assert shard.tokens.long().tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0, 10, 0]
    assert len(shard) == 14
    assert shard.path == out / "train.bin"
    assert shard.meta == {
        "format": "fgc-tokens",
        "version": 1,
        "vocab_size": 100,
        "dtype": "uint16",
        "eos_id": 0,
        "tokenizer": "test",
    }
    assert info["train_tokens"] == 14 and info["val_tokens"] == 0
    assert info["train_documents"] == 4 and info["val_documents"] == 0
    assert len(TokenShard.open(out, "val")) == 0


def test_round_trip_uint32(tmp_path):
    docs = [[70000, 1], [65536, 99999]]
    out, info = write(
        tmp_path, docs=docs, vocab_size=100000, eos_id=99999, val_fraction=0.5
    )
    train = TokenShard.open(out, "train")
    val = TokenShard.open(out, "val")
    assert info["dtype"] == "uint32"
    assert train.tokens.dtype == torch.uint32
    assert train.tokens.long().tolist() == [70000, 1, 99999]
    assert val.tokens.long().tolist() == [65536, 99999, 99999]


def test_dtype_boundary(tmp_path):
    _, info16 = write(tmp_path, vocab_size=65536, name="a")
    _, info32 = write(tmp_path, vocab_size=65537, name="b")
    assert info16["dtype"] == "uint16"
    assert info32["dtype"] == "uint32"


def test_header_bytes_exact(tmp_path):
    out, _ = write(tmp_path)
    data = (out / "train.bin").read_bytes()
    expected_header = b"FGCTOKS\x00" + struct.pack("<IIQ", 1, 2, 14) + bytes(40)
    assert len(expected_header) == 64
    assert data[:64] == expected_header
    assert data[64:] == struct.pack("<14H", 1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0, 10, 0)
    assert (out / "val.bin").read_bytes() == b"FGCTOKS\x00" + struct.pack(
        "<IIQ", 1, 2, 0
    ) + bytes(40)


def test_meta_json_content(tmp_path):
    out, _ = write(tmp_path)
    text = (out / "meta.json").read_text()
    assert text == (
        "{\n"
        '  "dtype": "uint16",\n'
        '  "eos_id": 0,\n'
        '  "format": "fgc-tokens",\n'
        '  "tokenizer": "test",\n'
        '  "version": 1,\n'
        '  "vocab_size": 100\n'
        "}\n"
    )


def test_deterministic_bytes(tmp_path):
    a, _ = write(tmp_path, val_fraction=0.25, name="a")
    b, _ = write(tmp_path, val_fraction=0.25, name="b")
    for name in ("meta.json", "train.bin", "val.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_val_split_counts(tmp_path):
    _, info = write(
        tmp_path, val_fraction=0.01, name="a"
    )  # rounds to 0 docs, but at least one
    assert (info["train_documents"], info["val_documents"]) == (3, 1)
    _, info = write(tmp_path, val_fraction=0.5, name="b")
    assert (info["train_documents"], info["val_documents"]) == (2, 2)
    _, info = write(
        tmp_path, docs=[[1]], val_fraction=0.5, name="c"
    )  # one doc stays in train
    assert (info["train_documents"], info["val_documents"]) == (1, 0)
    _, info = write(
        tmp_path,
        docs=[[i] for i in range(1, 101)],
        vocab_size=200,
        val_fraction=0.29,
        name="d",
    )
    assert info["val_documents"] == 29


def test_write_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="token id 100 is out of range"):
        write(tmp_path, docs=[[1, 100]])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        write(tmp_path, docs=[[-1]], name="neg")
    # nothing half-written: the directory the failed write created is gone
    assert not (tmp_path / "shards").exists()


# --- malformed shard directories: every error names the offending path -------------------------


def expect_error(data_dir, path, fragment, split="train"):
    with pytest.raises(RunError) as info:
        TokenShard.open(data_dir, split)
    err = info.value
    assert err.path == str(path)
    assert fragment in err.message
    assert str(err).startswith(f"{path}: error: ")
    assert "\n" not in str(err)


def test_missing_dir(tmp_path):
    expect_error(tmp_path / "nope", tmp_path / "nope", "no such token-shard directory")


def test_not_a_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(tmp_path / "file", tmp_path / "file", "not a directory")


def test_missing_meta(tmp_path):
    out, _ = write(tmp_path)
    (out / "meta.json").unlink()
    expect_error(out, out / "meta.json", "missing meta.json")


def test_bad_json(tmp_path):
    out, _ = write(tmp_path)
    (out / "meta.json").write_text("{not json")
    expect_error(out, out / "meta.json", "invalid JSON")


def test_wrong_format(tmp_path):
    out, _ = write(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    expect_error(out, out / "meta.json", "format is 'other'")
    (out / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    expect_error(out, out / "meta.json", "unsupported version 2")
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    expect_error(out, out / "meta.json", "dtype is 'int8'")


def test_missing_bin(tmp_path):
    out, _ = write(tmp_path)
    (out / "val.bin").unlink()
    expect_error(out, out / "val.bin", "missing val.bin", split="val")


def test_truncated_bin(tmp_path):
    out, _ = write(tmp_path)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-1])
    expect_error(out, out / "train.bin", "header says 14 tokens")
    (out / "train.bin").write_bytes(data[:10])
    expect_error(out, out / "train.bin", "shorter than the 64-byte header")


def test_bad_magic(tmp_path):
    out, _ = write(tmp_path)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(b"NOTTOKS\x00" + data[8:])
    expect_error(out, out / "train.bin", "magic")


def test_itemsize_mismatch(tmp_path):
    out, _ = write(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    expect_error(
        out, out / "train.bin", "itemsize is 2 bytes but meta.json says dtype uint32"
    )


def test_check_vocab(tmp_path):
    out, _ = write(tmp_path)
    shard = TokenShard.open(out)
    check_vocab(shard, 100)
    check_vocab(shard, 128)
    with pytest.raises(RunError) as info:
        check_vocab(shard, 50)
    assert info.value.path == str(out / "meta.json")
    assert "100" in info.value.message and "50" in info.value.message
    # meta vocab fits but an id does not (meta.json edited by hand)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "vocab_size": 8}))
    shard = TokenShard.open(out)
    with pytest.raises(RunError) as info:
        check_vocab(shard, 8)
    assert info.value.path == str(out / "train.bin")
    assert "token id 10" in info.value.message and "vocab_size 8" in info.value.message


# --- sampling ------------------------------------------------------------------------------------


def long_shard(tmp_path, n_tokens=1001, name="long"):
    # one document of distinct ids, so a window's first token identifies the window
    out, _ = write(
        tmp_path,
        docs=[list(range(1, n_tokens))],
        vocab_size=n_tokens + 1,
        eos_id=n_tokens,
        name=name,
    )
    return TokenShard.open(out)


def test_sampler_shapes_and_labels(tmp_path):
    shard = long_shard(tmp_path)
    sampler = BatchSampler(shard, seq_len=10, global_batch_size=4, seed=0)
    assert sampler.num_windows == 100  # (1001 - 1) // 10
    inputs, labels = sampler.batch(0)
    assert inputs.shape == labels.shape == (4, 10)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    tokens = shard.tokens.long()
    for row_in, row_lab in zip(inputs, labels):
        start = int(row_in[0]) - 1  # token id i sits at offset i - 1
        assert start % 10 == 0
        assert torch.equal(row_in, tokens[start : start + 10])
        assert torch.equal(row_lab, tokens[start + 1 : start + 11])


def test_sampler_same_global_batch_any_world_size(tmp_path):
    shard = long_shard(tmp_path)
    one = BatchSampler(shard, seq_len=10, global_batch_size=8, seed=3)
    ranks = [
        BatchSampler(
            shard, seq_len=10, global_batch_size=8, seed=3, rank=r, world_size=2
        )
        for r in range(2)
    ]
    for step in (
        0,
        1,
        12,
        13,
        30,
    ):  # 12 and 25 straddle epoch boundaries (100 windows / 8)
        full_in, full_lab = one.batch(step)
        parts = [s.batch(step) for s in ranks]
        assert parts[0][0].shape == (4, 10)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_in)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_lab)


def test_sampler_epoch_covers_every_window_once(tmp_path):
    shard = long_shard(tmp_path)
    ranks = [
        BatchSampler(
            shard, seq_len=10, global_batch_size=4, seed=7, rank=r, world_size=2
        )
        for r in range(2)
    ]
    starts = []
    for step in range(25):  # 25 steps * 4 samples = exactly one epoch of 100 windows
        for s in ranks:
            starts.extend(s.window_starts(step))
    assert sorted(starts) == [j * 10 for j in range(100)]
    # the next epoch is a different permutation of all windows again
    nxt = []
    for step in range(25, 50):
        for s in ranks:
            nxt.extend(s.window_starts(step))
    assert sorted(nxt) == sorted(starts)
    assert nxt != starts


def test_sampler_epoch_wrap_and_permutation_rule(tmp_path):
    shard = long_shard(tmp_path, n_tokens=71)  # 7 windows of seq_len 10
    sampler = BatchSampler(shard, seq_len=10, global_batch_size=3, seed=5)
    assert sampler.num_windows == 7
    perm0 = torch.randperm(7, generator=torch.Generator().manual_seed(5)).tolist()
    perm1 = torch.randperm(7, generator=torch.Generator().manual_seed(6)).tolist()
    assert sampler.window_starts(0) == [10 * j for j in perm0[0:3]]
    # step 2 is global samples 6, 7, 8: the last of epoch 0 then the first two of epoch 1
    assert sampler.window_starts(2) == [10 * perm0[6], 10 * perm1[0], 10 * perm1[1]]


def test_sampler_deterministic(tmp_path):
    shard = long_shard(tmp_path)
    a = BatchSampler(shard, seq_len=10, global_batch_size=4, seed=1)
    b = BatchSampler(shard, seq_len=10, global_batch_size=4, seed=1)
    c = BatchSampler(shard, seq_len=10, global_batch_size=4, seed=2)
    # visiting steps out of order (as a resume does) gives the same batches
    assert torch.equal(a.batch(40)[0], b.batch(40)[0])
    assert torch.equal(a.batch(3)[0], b.batch(3)[0])
    assert not torch.equal(a.batch(3)[0], c.batch(3)[0])


def test_sampler_errors(tmp_path):
    shard = long_shard(tmp_path, n_tokens=11)
    with pytest.raises(RunError, match="not divisible by the world size 2"):
        BatchSampler(shard, seq_len=4, global_batch_size=3, seed=0, world_size=2)
    with pytest.raises(RunError) as info:
        BatchSampler(shard, seq_len=20, global_batch_size=2, seed=0)
    assert info.value.path == str(shard.path)
    assert "too few" in info.value.message


def test_eval_batches(tmp_path):
    out, _ = write(
        tmp_path,
        docs=[list(range(1, 50)), list(range(50, 100))],
        vocab_size=200,
        eos_id=150,
        val_fraction=0.5,
    )
    val = TokenShard.open(out, "val")
    assert len(val) == 51  # 50..99 plus eos
    # (51 - 1) // 5 = 10 windows; batches of 4 -> 2 full batches
    assert num_eval_batches(val, seq_len=5, batch_size=4, max_batches=None) == 2
    batches = list(eval_batches(val, seq_len=5, batch_size=4, max_batches=None))
    assert len(batches) == 2
    inputs, labels = batches[1]
    assert inputs[:, 0].tolist() == [70, 75, 80, 85]  # windows 4..7 in order
    assert inputs[0].tolist() == [70, 71, 72, 73, 74]
    assert labels[0].tolist() == [71, 72, 73, 74, 75]
    assert len(list(eval_batches(val, seq_len=5, batch_size=4, max_batches=1))) == 1
    # two ranks split each batch into contiguous halves
    r0 = list(
        eval_batches(
            val, seq_len=5, batch_size=4, max_batches=None, rank=0, world_size=2
        )
    )
    r1 = list(
        eval_batches(
            val, seq_len=5, batch_size=4, max_batches=None, rank=1, world_size=2
        )
    )
    for (full_in, full_lab), (a_in, a_lab), (b_in, b_lab) in zip(batches, r0, r1):
        assert torch.equal(torch.cat([a_in, b_in]), full_in)
        assert torch.equal(torch.cat([a_lab, b_lab]), full_lab)
    # too few windows for one batch is an error naming the file; an empty split yields nothing
    with pytest.raises(RunError) as info:
        eval_batches(val, seq_len=5, batch_size=16, max_batches=None)
    assert info.value.path == str(out / "val.bin")
    out2, _ = write(tmp_path, name="noval")
    assert (
        list(
            eval_batches(
                TokenShard.open(out2, "val"), seq_len=5, batch_size=4, max_batches=None
            )
        )
        == []
    )


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    ids = tok.encode("héllo")
    assert ids == [104, 195, 169, 108, 108, 111]
    assert tok.decode(ids + [256] + tok.encode("!")) == "héllo!"
    assert tok.decode(torch.tensor([104, 256, 195])) == "h\ufffd"
