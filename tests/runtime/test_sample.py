"""Text samples: deterministic, the training RNG untouched, decoded with the data's tokenizer."""

import json

import pytest
import torch
from torch import nn

from fgc_runtime.data import ByteTokenizer, write_token_shards
from fgc_runtime.errors import RunError
from fgc_runtime.sample import TextSampler, generate, load_tokenizer


class TinyLM(nn.Module):
    """Logits from the last few tokens: enough to make greedy and sampled outputs differ."""

    def __init__(self, vocab=257):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)
        self.calls = []

    def forward(self, ids):
        self.calls.append(ids.shape[1])
        x = self.embed(ids).cumsum(dim=1)
        return self.head(torch.tanh(x)) * 3


def test_greedy_is_the_argmax_chain_and_crops_the_context():
    model = TinyLM()
    new = generate(model, [84, 104, 101], 6, context_len=4)
    ids = [84, 104, 101]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids[-4:]]))[0, -1].argmax()))
    assert new == ids[3:]
    assert max(model.calls) == 4  # never more than context_len tokens
    assert model.training  # the mode is restored


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model = TinyLM()
    torch.manual_seed(123)
    before = torch.get_rng_state()

    def draw(seed):
        return generate(model, [1, 2], 12, context_len=8, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(5), draw(5), draw(6)
    assert a == b
    assert a != c
    assert torch.equal(torch.get_rng_state(), before)
    assert a != generate(model, [1, 2], 12, context_len=8)  # not the greedy chain


def test_generation_stops_after_eos():
    model = TinyLM()
    greedy = generate(model, [1, 2], 12, context_len=8)
    eos = greedy[3]
    first = greedy.index(eos)
    assert generate(model, [1, 2], 12, context_len=8, eos_id=eos) == greedy[: first + 1]


def test_text_sampler_writes_samples_jsonl_on_the_writing_rank_only(tmp_path):
    model = TinyLM()
    kw = dict(prompt="The", max_new_tokens=5, temperature=0.7, seed=42, context_len=16)
    sampler = TextSampler(ByteTokenizer(), tmp_path / "run", **kw)
    first = sampler.sample(model, 10, "cpu")
    again = sampler.sample(model, 10, "cpu")
    later = sampler.sample(model, 20, "cpu")
    assert first == again  # the generator is seeded by seed + step: a resumed run draws the same
    assert first["step"] == 10 and first["prompt"] == "The"
    lines = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert lines == [first, again, later]
    silent = TextSampler(ByteTokenizer(), tmp_path / "other", write=False, **kw)
    assert silent.sample(model, 10, "cpu") == first
    assert not (tmp_path / "other").exists()
    with pytest.raises(RunError, match="encodes to no tokens"):
        TextSampler(ByteTokenizer(), tmp_path, **{**kw, "prompt": ""})


def _shards(path, tokenizer, vocab_size=257, eos_id=256):
    write_token_shards(path, [[1, 2, 3]], vocab_size=vocab_size, eos_id=eos_id, tokenizer=tokenizer)
    return path


def test_byte_tokenizer_from_meta(tmp_path):
    tok, why = load_tokenizer(_shards(tmp_path, "byte"))
    assert isinstance(tok, ByteTokenizer) and why == ""


def test_tokenizer_json_beside_the_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1, "the": 2, "cat": 3, "sat": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    data = _shards(tmp_path / "data", "tokenizer.json", vocab_size=5, eos_id=1)
    hf.save(str(data / "tokenizer.json"))
    tok, why = load_tokenizer(data)
    assert why == ""
    assert tok.encode("the cat sat") == [2, 3, 4]
    assert tok.decode([2, 3, 1, 4]) == "the cat sat"  # eos is dropped


def test_no_tokenizer_file_is_a_reason_not_an_error(tmp_path):
    tok, why = load_tokenizer(_shards(tmp_path, "gpt2"))
    assert tok is None
    assert "tokenizer.json does not exist" in why


def test_unreadable_tokenizer_json_is_a_run_error(tmp_path):
    data = _shards(tmp_path, "mine")
    (data / "tokenizer.json").write_text("{not json")
    with pytest.raises(RunError, match="cannot read the tokenizer") as info:
        load_tokenizer(data)
    assert str(data / "tokenizer.json") in str(info.value)
