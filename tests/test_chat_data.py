"""`fgc data` on datasets (JSONL, JSON, Parquet, save_to_disk) in text and chat mode: chat templates
(the tokenizer's own, or chatml installed with its tokens), loss masks, errors, and the batches the
trainers read from masked shards. Tokenizers are tiny BPEs trained here (no downloads)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from conftest import REPO, run_fgc
from fgc.data import tokenize_to_shards
from fgc_runtime.data import (
    BatchSampler,
    TokenShard,
    document_ids,
    eval_batches,
    write_token_shards,
)
from test_fgc_data import train_bpe

KINDS = ("jsonl", "json", "parquet", "disk")
CONVERSATION = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the quick fox"},
    {"role": "user", "content": "and then?"},
    {"role": "assistant", "content": "the lazy dog"},
]
SHAREGPT = [
    {"from": "human", "value": "hello"},
    {"from": "gpt", "value": "world"},
]
OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def write_records(directory: Path, kind: str, records: list[dict], name: str = "data") -> Path:
    """RECORDS as one input of KIND in DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path
    if kind == "json":
        path = directory / f"{name}.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    import datasets

    ds = datasets.Dataset.from_list(records)
    if kind == "parquet":
        path = directory / f"{name}.parquet"
        ds.to_parquet(str(path))
        return path
    path = directory / name
    ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    """A base BPE (eos <|endoftext|> = 0, 300 ids) without a chat template."""
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    train_bpe().save(str(path))
    return path


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory) -> Path:
    """A chat tokenizer directory with its own template, turn tokens and eos <|eot|>."""
    directory = tmp_path_factory.mktemp("own")
    tok = train_bpe(special_tokens=("<|endoftext|>", "<s>", "<|start|>", "<|eot|>"))
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|eot|>", "chat_template": OWN_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def split_documents(ids: list[int], masks: list[int], eos: int) -> list[tuple[list[int], list[int]]]:
    """The (ids, mask) of each document of a split, separators dropped."""
    docs, cur, cur_mask = [], [], []
    for i, m in zip(ids, masks):
        if i == eos:
            docs.append((cur, cur_mask))
            cur, cur_mask = [], []
        else:
            cur.append(i)
            cur_mask.append(m)
    assert not cur
    return docs


def read_split(out: Path, split: str = "train"):
    shard = TokenShard.open(out, split)
    mask = shard.mask.tolist() if shard.mask is not None else None
    return shard.tokens.long().tolist(), mask


# --- text mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_text_field_of_each_kind(tmp_path, bpe_file, kind):
    texts = ["the quick brown fox", "hello world, tokenizers", "the lazy dog"]
    source = write_records(tmp_path / "in", kind, [{"text": t, "other": 1} for t in texts])
    info = tokenize_to_shards([str(source)], tmp_path / "out", tokenizer=str(bpe_file), val_fraction=0.3)
    tok = Tokenizer.from_file(str(bpe_file))
    expected = [tok.encode(t, add_special_tokens=False).ids + [0] for t in texts]
    assert read_split(tmp_path / "out") == (sum(expected[:2], []), None)
    assert read_split(tmp_path / "out", "val") == (expected[2], None)
    assert (info["train_documents"], info["val_documents"]) == (2, 1)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert "loss_mask" not in meta and not (tmp_path / "out" / "train.mask.bin").exists()


def test_text_files_and_records_together_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    source = write_records(tmp_path, "jsonl", [{"text": "third"}])
    tokenize_to_shards([str(tmp_path / "a.txt"), str(source)], tmp_path / "out")
    ids, _ = read_split(tmp_path / "out")
    assert bytes(i for i in ids if i != 256) == b"firstsecondthird" and ids.count(256) == 3


# --- chat mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", ["openai", "sharegpt"])
def test_chat_of_each_kind_and_style(tmp_path, bpe_file, kind, style):
    from transformers import AutoTokenizer

    record = {"messages": CONVERSATION} if style == "openai" else {"conversations": SHAREGPT}
    source = write_records(tmp_path / "in", kind, [record, record])
    out = tmp_path / "out"
    info = tokenize_to_shards(
        [str(source)], out, tokenizer=str(bpe_file), format="chat", chat_template="chatml", val_fraction=0.5
    )
    assert (info["train_documents"], info["val_documents"]) == (1, 1)
    auto = AutoTokenizer.from_pretrained(str(out))
    messages = (
        CONVERSATION
        if style == "openai"
        else [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
        ]
    )
    expected = auto.apply_chat_template(messages, tokenize=True)["input_ids"]
    answers = ["the quick fox", "the lazy dog"] if style == "openai" else ["world"]
    for split in ("train", "val"):
        ids, mask = read_split(out, split)
        [(doc, doc_mask)] = split_documents(ids, mask, info["eos_id"])
        assert doc == expected
        assert auto.decode([i for i, m in zip(doc, doc_mask) if m]) == "".join(a + "<|im_end|>" for a in answers)


def test_masks_exactly_right_on_a_hand_checked_conversation(tmp_path, bpe_file):
    source = write_records(tmp_path, "jsonl", [{"messages": CONVERSATION}])
    out = tmp_path / "out"
    info = tokenize_to_shards([str(source)], out, tokenizer=str(bpe_file), format="chat", chat_template="chatml")
    tok = Tokenizer.from_file(str(bpe_file))
    start, end, eos = 300, 301, 0  # <|im_start|>, <|im_end|> added after the 300 ids; <|endoftext|>

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    # the chatml rendering, piece by piece: a piece's tokens are targets when flagged 1
    pieces = [
        ([start] + enc("system\nbe kind"), 0),
        ([end] + enc("\n"), 0),
        ([start] + enc("user\nhello world"), 0),
        ([end] + enc("\n"), 0),
        ([start] + enc("assistant\n"), 0),
        (enc("the quick fox") + [end], 1),
        (enc("\n"), 0),
        ([start] + enc("user\nand then?"), 0),
        ([end] + enc("\n"), 0),
        ([start] + enc("assistant\n"), 0),
        (enc("the lazy dog") + [end], 1),
        (enc("\n"), 0),
    ]
    ids, mask = read_split(out)
    assert ids == sum((p for p, _ in pieces), []) + [eos]
    assert mask == sum(([flag] * len(p) for p, flag in pieces), []) + [0]
    assert info["target_tokens"] == sum(mask)
    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    masked = [i for i, m in zip(ids, mask) if m]
    assert saved.decode(masked, skip_special_tokens=False) == "the quick fox<|im_end|>the lazy dog<|im_end|>"


def test_chatml_grafting_adds_tokens_and_transformers_reproduces_the_ids(tmp_path, bpe_file):
    from transformers import AutoTokenizer

    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps over"}],
        [{"role": "user", "content": "Ünïcödé ✓"}, {"role": "assistant", "content": ""}],
    ]
    source = write_records(tmp_path, "jsonl", [{"messages": c} for c in conversations])
    out = tmp_path / "out"
    proc = run_fgc("data", source, "-o", out, "--tokenizer", bpe_file, "--format", "chat", "--chat-template", "chatml")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 302 and meta["loss_mask"] is True and meta["eos_id"] == 0
    assert meta["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert [Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(t) for t in meta["added_tokens"]] == [300, 301]
    assert meta["eos_ids"] == [0, 301]
    assert meta["chat_template"] == (REPO / "fgc" / "chat_templates" / "chatml.jinja").read_text().rstrip("\n")
    assert "vocab 302" in proc.stderr and "target tokens" in proc.stderr
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == meta["chat_template"] and config["eos_token"] == "<|endoftext|>"
    auto = AutoTokenizer.from_pretrained(str(out))
    assert len(auto) == 302
    ids, mask = read_split(out)
    docs = split_documents(ids, mask, 0)
    assert [d for d, _ in docs] == [auto.apply_chat_template(c, tokenize=True)["input_ids"] for c in conversations]
    # an empty answer still teaches the end of the turn
    assert [i for i, m in zip(*docs[2]) if m] == [301]


def test_own_template_is_kept_and_separator_avoids_the_turn_token(tmp_path, own_dir):
    from transformers import AutoTokenizer

    source = write_records(tmp_path, "jsonl", [{"messages": CONVERSATION}] * 2)
    out = tmp_path / "out"
    info = tokenize_to_shards([str(source)], out, tokenizer=str(own_dir), format="chat")
    own = Tokenizer.from_file(str(own_dir / "tokenizer.json"))
    eot, endoftext = own.token_to_id("<|eot|>"), own.token_to_id("<|endoftext|>")
    # <|eot|>, the tokenizer's eos, ends every turn: conversations are separated by <|endoftext|>
    assert info["eos_id"] == endoftext and info["eos_ids"] == sorted({eot, endoftext})
    # a model directory's generation_config.json adds its own end ids
    (own_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 5]}))
    try:
        again = tokenize_to_shards([str(source)], tmp_path / "again", tokenizer=str(own_dir), format="chat")
    finally:
        (own_dir / "generation_config.json").unlink()
    assert again["eos_ids"] == sorted({eot, endoftext, 5})
    assert info["chat_template"] == OWN_TEMPLATE and info["added_tokens"] == [] and info["vocab_size"] == 300
    auto = AutoTokenizer.from_pretrained(str(out))
    ids, mask = read_split(out)
    docs = split_documents(ids, mask, endoftext)
    expected = auto.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert [d for d, _ in docs] == [expected, expected] and expected[0] == own.token_to_id("<s>")
    masked = [i for i, m in zip(*docs[0]) if m]
    assert own.decode(masked, skip_special_tokens=False) == "the quick fox<|eot|>the lazy dog<|eot|>"
    # --chat-template replaces it
    info = tokenize_to_shards(
        [str(source)], tmp_path / "chatml", tokenizer=str(own_dir), format="chat", chat_template="chatml"
    )
    assert info["chat_template"].startswith("{% for message in messages %}")
    assert info["added_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_a_tokenizer_saved_by_transformers_keeps_its_template_file(tmp_path, bpe_file):
    """transformers saves a template as chat_template.jinja: a directory it wrote (here, from
    chatml shards) is a chat tokenizer, read without --chat-template, and gives the same ids."""
    from transformers import AutoTokenizer

    source = write_records(tmp_path, "jsonl", [{"messages": CONVERSATION}])
    first = tokenize_to_shards(
        [str(source)], tmp_path / "first", tokenizer=str(bpe_file), format="chat", chat_template="chatml"
    )
    AutoTokenizer.from_pretrained(str(tmp_path / "first")).save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    again = tokenize_to_shards([str(source)], tmp_path / "again", tokenizer=str(tmp_path / "saved"), format="chat")
    assert again["added_tokens"] == [] and again["chat_template"] == first["chat_template"]
    assert read_split(tmp_path / "again") == read_split(tmp_path / "first")


def test_a_saved_dataset_dict_reads_its_train_split(tmp_path, bpe_file):
    import datasets

    ds = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list([{"text": "hello world"}]),
            "train": datasets.Dataset.from_list([{"text": "the quick fox"}, {"text": "the lazy dog"}]),
        }
    )
    ds.save_to_disk(str(tmp_path / "dd"))
    info = tokenize_to_shards([str(tmp_path / "dd")], tmp_path / "out", tokenizer=str(bpe_file))
    tok = Tokenizer.from_file(str(bpe_file))
    expected = [tok.encode(t, add_special_tokens=False).ids + [0] for t in ("the quick fox", "the lazy dog")]
    assert read_split(tmp_path / "out") == (sum(expected, []), None) and info["train_documents"] == 2


def test_template_whose_prefix_renders_differently(tmp_path, own_dir):
    """The last assistant message gets a header the earlier ones do not: rendering a prefix is not
    a prefix of the whole, and the spans are found by searching the contents instead."""
    template = tmp_path / "think.jinja"
    template.write_text(
        "{% for m in messages %}<|start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}<|eot|>"
        "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
    )
    source = write_records(tmp_path, "jsonl", [{"messages": CONVERSATION}])
    info = tokenize_to_shards(
        [str(source)], tmp_path / "out", tokenizer=str(own_dir), format="chat", chat_template=str(template)
    )
    own = Tokenizer.from_file(str(own_dir / "tokenizer.json"))
    ids, mask = read_split(tmp_path / "out")
    masked = [i for i, m in zip(ids, mask) if m]
    assert own.decode(masked, skip_special_tokens=False) == "the quick fox<|eot|><think></think>the lazy dog<|eot|>"
    assert info["added_tokens"] == []  # the template uses no chatml token


def test_parallel_workers_give_the_same_shards(tmp_path, bpe_file):
    records = [
        {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"fox {i % 7}"}]}
        for i in range(1100)  # more than two batches of 512
    ]
    source = write_records(tmp_path, "jsonl", records)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_to_shards(
            [str(source)],
            out,
            tokenizer=str(bpe_file),
            format="chat",
            chat_template="chatml",
            val_fraction=0.1,
            workers=workers,
        )
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    assert len(split_documents(*read_split(tmp_path / "w2"), 0)) == 990


def test_document_masking_keeps_conversations_apart(tmp_path, bpe_file):
    convs = [
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
        [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"}],
        [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "sleeps"}],
    ]
    source = write_records(tmp_path, "jsonl", [{"messages": c} for c in convs])
    info = tokenize_to_shards(
        [str(source)], tmp_path / "out", tokenizer=str(bpe_file), format="chat", chat_template="chatml"
    )
    ids, mask = read_split(tmp_path / "out")
    lengths = [len(d) + 1 for d, _ in split_documents(ids, mask, info["eos_id"])]
    doc = document_ids(torch.tensor([ids]), info["eos_id"])[0].tolist()
    # every token of conversation k (its separator included) is in document k, and only those
    assert doc == sum(([k] * n for k, n in enumerate(lengths)), [])


# --- the batches of masked shards ---------------------------------------------------------------


def masked_shards(tmp_path):
    docs = [
        ([5, 6, 7, 8], [0, 1, 1, 0]),
        ([9, 10, 11], [1, 0, 1]),
        ([12, 13, 14, 15, 16], [0, 0, 1, 1, 1]),
        ([17, 18], [1, 1]),
        ([19, 20, 21], [0, 1, 0]),
    ]
    out = tmp_path / "masked"
    write_token_shards(out, docs, vocab_size=50, eos_id=1, tokenizer="test", loss_mask=True, val_fraction=0.4)
    plain = tmp_path / "plain"
    write_token_shards(plain, [d for d, _ in docs], vocab_size=50, eos_id=1, tokenizer="test", val_fraction=0.4)
    return out, plain


def test_batch_labels_are_ignored_exactly_where_the_mask_is_zero(tmp_path):
    out, plain = masked_shards(tmp_path)
    shard, plain_shard = TokenShard.open(out), TokenShard.open(plain)
    assert shard.mask.tolist() == [0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0]
    assert plain_shard.mask is None and torch.equal(shard.tokens, plain_shard.tokens)
    seq_len = 3
    sampler = BatchSampler(shard, seq_len=seq_len, global_batch_size=2, seed=0)
    plain_sampler = BatchSampler(plain_shard, seq_len=seq_len, global_batch_size=2, seed=0)
    tokens, mask = shard.tokens.long(), shard.mask
    for step in range(5):
        inputs, labels = sampler.batch(step)
        plain_inputs, plain_labels = plain_sampler.batch(step)
        assert torch.equal(inputs, plain_inputs)
        for row, start in enumerate(sampler.window_starts(step)):
            # text shards: every label is the next token, as before
            assert plain_labels[row].tolist() == tokens[start + 1 : start + seq_len + 1].tolist()
            expected = [int(tokens[start + 1 + t]) if mask[start + 1 + t] else -100 for t in range(seq_len)]
            assert labels[row].tolist() == expected
    # two ranks take halves of the same global batch
    halves = [
        BatchSampler(shard, seq_len=seq_len, global_batch_size=2, seed=0, rank=r, world_size=2).batch(3)[1]
        for r in range(2)
    ]
    assert torch.equal(torch.cat(halves), sampler.batch(3)[1])


def test_eval_labels_are_masked_too(tmp_path):
    out, plain = masked_shards(tmp_path)
    val, plain_val = TokenShard.open(out, "val"), TokenShard.open(plain, "val")
    assert val.tokens.long().tolist() == [17, 18, 1, 19, 20, 21, 1]
    assert val.mask.tolist() == [1, 1, 0, 0, 1, 0, 0]
    [(inputs, labels)] = list(eval_batches(val, seq_len=2, batch_size=3, max_batches=None))
    [(plain_inputs, plain_labels)] = list(eval_batches(plain_val, seq_len=2, batch_size=3, max_batches=None))
    assert torch.equal(inputs, plain_inputs)
    assert plain_labels.tolist() == [[18, 1], [19, 20], [21, 1]]
    assert labels.tolist() == [[18, -100], [-100, 20], [-100, -100]]


def test_mask_file_problems_name_the_file(tmp_path):
    from fgc_runtime.errors import RunError

    out, _ = masked_shards(tmp_path)
    (out / "train.mask.bin").unlink()
    with pytest.raises(RunError) as info:
        TokenShard.open(out)
    assert info.value.path == str(out / "train.mask.bin") and "meta.json says the shards have loss masks" in str(
        info.value
    )


def test_a_text_run_into_a_chat_directory_drops_its_masks(tmp_path):
    out, _ = masked_shards(tmp_path)
    write_token_shards(out, [[3, 4]], vocab_size=50, eos_id=1, tokenizer="test")
    assert not (out / "train.mask.bin").exists() and TokenShard.open(out).mask is None


def test_a_text_run_keeps_a_mask_named_file_it_did_not_write(tmp_path):
    """Only the masks of chat shards (meta.json says so) are removed, never a user's file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.mask.bin").write_bytes(b"mine")
    write_token_shards(out, [[3, 4]], vocab_size=50, eos_id=1, tokenizer="test")
    assert (out / "train.mask.bin").read_bytes() == b"mine"


# --- errors -------------------------------------------------------------------------------------


def expect_error(tmp_path, args, first_line, out="out"):
    proc = run_fgc("data", *args, "-o", tmp_path / out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == first_line
    assert not (tmp_path / out).exists()
    return proc


def test_errors_through_the_cli(tmp_path, bpe_file):
    chat = ["--tokenizer", bpe_file, "--format", "chat", "--chat-template", "chatml"]
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
    (tmp_path / "missing.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"text": "x"}) + "\n")
    expect_error(
        tmp_path,
        ["missing.jsonl", *chat],
        'missing.jsonl: error: record 2: has neither "messages" (OpenAI style) nor "conversations" (ShareGPT style)',
    )
    (tmp_path / "role.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n"
    )
    expect_error(
        tmp_path,
        ["role.jsonl", *chat],
        "role.jsonl: error: record 2: message 1: unknown role 'bot' (expected human, gpt, system)",
    )
    write_records(tmp_path, "parquet", [good, {"messages": []}], name="empty")
    expect_error(tmp_path, ["empty.parquet", *chat], "empty.parquet: error: record 2: empty conversation")
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    expect_error(tmp_path, ["text.jsonl"], 'text.jsonl: error: record 2: no "text" field')
    proc = expect_error(tmp_path, ["role.jsonl"], 'role.jsonl: error: record 1: no "text" field')
    assert (
        proc.stderr.splitlines()[1] == "  hint: this file has 'messages' or 'conversations' fields: use --format chat"
    )
    expect_error(
        tmp_path, ["text.jsonl", "--format", "chats"], "fgc: error: unknown --format 'chats' (expected text or chat)"
    )
    (tmp_path / "table.csv").write_text("text\nhello\n")
    expect_error(
        tmp_path,
        ["table.csv"],
        "table.csv: error: cannot read this kind of file (expected .jsonl, .json, .parquet or a datasets "
        "directory saved with save_to_disk, or text (.txt, .md, .text))",
    )
    (tmp_path / "notes.txt").write_text("hello\n")
    expect_error(
        tmp_path,
        ["notes.txt", *chat],
        "notes.txt: error: cannot read conversations from this kind of file (expected .jsonl, .json, .parquet or "
        "a datasets directory saved with save_to_disk)",
    )
    expect_error(tmp_path, ["nope.jsonl", *chat], "nope.jsonl: error: no such file or directory")
    (tmp_path / "broken.json").write_text("{not json")
    proc = run_fgc("data", "broken.json", "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("broken.json: error: cannot read this file as json: ")
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
    # no template: the hint names --chat-template chatml
    proc = expect_error(
        tmp_path,
        ["role.jsonl", "--tokenizer", bpe_file, "--format", "chat"],
        f"{bpe_file}: error: the tokenizer has no chat template",
    )
    assert (
        proc.stderr.splitlines()[1] == "  hint: install one with --chat-template chatml (or --chat-template FILE.jinja)"
    )
    expect_error(
        tmp_path,
        ["role.jsonl", "--tokenizer", bpe_file, "--format", "chat", "--chat-template", "nope.jinja"],
        "nope.jinja: error: no such chat template file",
    )
    expect_error(tmp_path, ["role.jsonl", "--format", "chat"], "byte: error: chat data needs a Hugging Face tokenizer")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ raise_exception('roles must alternate') }}")
    expect_error(
        tmp_path,
        ["missing.jsonl", "--tokenizer", bpe_file, "--format", "chat", "--chat-template", bad],
        "missing.jsonl: error: record 1: the chat template fails to render it: roles must alternate",
    )


def test_an_error_mid_stream_leaves_the_directory_as_it_was(tmp_path, bpe_file):
    """Records are written as they come: a bad record after a thousand good ones leaves neither
    half-written shards nor a tokenizer, and an earlier run's shards stay as they were."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
    chat = ["--tokenizer", bpe_file, "--format", "chat", "--chat-template", "chatml"]
    write_records(tmp_path, "jsonl", [good] * 3, name="ok")
    proc = run_fgc("data", "ok.jsonl", "-o", "out", *chat, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    write_records(tmp_path, "jsonl", [good] * 1200 + [{"messages": [{"role": "user"}]}], name="late")
    proc = run_fgc("data", "late.jsonl", "-o", "out", *chat, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        'late.jsonl: error: record 1201: message 1 has no "content" (expected text)'
    ]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    proc = run_fgc("data", "late.jsonl", "-o", "fresh", *chat, cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "fresh").exists()


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainers_take_the_loss_over_masked_targets_only(tmp_path, bpe_file):
    """A tiny model trained one step on chat shards logs, with every trainer, the loss computed
    here over the masked targets of the first batch only: the cross-entropy of the assistant
    tokens, averaged over their count. Document masking on for the basic, DDP and FSDP2 trainers;
    off for those that lack it (pipeline, DiLoCo, the chunked loss), against a reference without it."""
    import importlib.util

    from fgc_runtime.data import DocumentMasking

    from family_checks import logged_losses, train

    records = [
        {
            "messages": [
                {"role": "user", "content": f"what is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a in range(6)
        for b in range(6)
    ]
    source = write_records(tmp_path, "jsonl", records)
    shards = tmp_path / "shards"
    run_fgc(
        "data",
        source,
        "-o",
        shards,
        "--tokenizer",
        bpe_file,
        "--format",
        "chat",
        "--chat-template",
        "chatml",
        check=True,
    )
    seq_len, batch_size, seed = 32, 4, 3
    defines = {
        "data_dir": shards,
        "vocab_size": 302,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_steps": 1,
        "log_every": 1,
        "eval_every": 0,
        "seed": seed,
    }
    args = [a for k, v in defines.items() for a in ("-D", f"{k}={v}")]
    runs = {
        "basic": ["trainer_type=basic", "document_masking=true"],
        "ddp": ["trainer_type=ddp", "document_masking=true"],
        "fsdp2": ["trainer_type=fsdp2", "document_masking=true"],
        "pipeline": ["trainer_type=pipeline"],
        "diloco": ["trainer_type=diloco"],
        "chunked": ["trainer_type=basic", "loss_impl=chunked"],
    }
    losses = {}
    for name, flags in runs.items():
        pkg = tmp_path / name
        run_fgc(
            "build",
            REPO / "fgc" / "templates" / "lm" / "train.yaml",
            "-o",
            pkg,
            *args,
            *(a for flag in flags for a in ("-D", flag)),
            check=True,
        )
        proc = train(pkg, "--output-dir", tmp_path / f"run-{name}", torchrun="trainer_type=basic" not in flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [losses[name]] = logged_losses(tmp_path / f"run-{name}")

    # the reference: the package's own model, initialised as train.py does (seed, then build)
    spec = importlib.util.spec_from_file_location("chat_model", tmp_path / "basic" / "model.py")
    sys.path.insert(0, str(tmp_path / "basic"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(seed)
        model = module.build_model()
    finally:
        sys.path.remove(str(tmp_path / "basic"))
    shard = TokenShard.open(shards)
    sampler = BatchSampler(shard, seq_len=seq_len, global_batch_size=batch_size, seed=seed)
    inputs, labels = sampler.batch(0)
    tokens = shard.tokens.long()
    unmasked = torch.stack([tokens[s + 1 : s + seq_len + 1] for s in sampler.window_starts(0)])
    targets = labels != -100
    assert 0 < int(targets.sum()) < labels.numel()  # prompts and separators are not targets
    with torch.no_grad():
        logits = DocumentMasking(model, shard.meta["eos_id"])(inputs).float()
        plain_logits = model(inputs).float()  # attention across the packed conversations
    masked = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain = torch.nn.functional.cross_entropy(plain_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    everything = torch.nn.functional.cross_entropy(logits.flatten(0, 1), unmasked.flatten())
    for name in ("basic", "ddp", "fsdp2"):
        assert losses[name] == pytest.approx(masked.item(), rel=1e-5), name
    for name in ("pipeline", "diloco", "chunked"):
        assert losses[name] == pytest.approx(plain.item(), rel=1e-5), name
    assert abs(masked.item() - everything.item()) > 1e-3  # the mask matters
