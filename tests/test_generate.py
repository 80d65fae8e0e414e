"""generate.py and chat exports: a package's sampling from a checkpoint (greedy, top-p, streamed,
stopping at any EOS id of the data, chat mode with the tokenizer's template and the conversation's
history) and the Hugging Face export of chat data (every EOS id in generation_config.json, the
tokenizer with its chat template, so transformers' generate stops at the end of the turn).

The data is the test's own: a byte-level BPE trained here with `tokenizers`, ChatML turns, and
meta.json with "eos_ids" written as `fgc data --format chat` writes them (no downloads).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fgc.build import build_package, compile_config
from fgc.codegen.closure import closure
from fgc.families import FAMILIES
from fgc_runtime import checkpoint, hf
from fgc_runtime.data import ByteTokenizer, write_token_shards
from fgc_runtime.errors import RunError
from fgc_runtime.sample import (
    StreamDecoder,
    chat_template,
    eos_ids,
    generate,
    load_tokenizer,
    nucleus,
    render_chat,
)

tokenizers = pytest.importorskip("tokenizers")

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SEQ_LEN = 64
SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, tokenizers", "what does the fox say"]


def train_bpe():
    """A byte-level BPE with the ChatML tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 50, trainer)
    return tok


def chat_data(out: Path, tok, template: str | None = CHATML) -> Path:
    """Chat shards in OUT: ChatML conversations, meta.json with eos_ids, the tokenizer files with
    TEMPLATE (none: a tokenizer_config.json without one)."""
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    docs = []
    for i in range(40):
        user, assistant = SENTENCES[i % 3], SENTENCES[(i + 1) % 3]
        text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"
        docs.append(tok.encode(text, add_special_tokens=False).ids)
    vocab = tok.get_vocab_size()
    write_token_shards(out, docs, vocab_size=vocab, eos_id=ids["<|endoftext|>"], tokenizer="tokenizer.json")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
            for t in SPECIALS
        },
    }
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    meta = json.loads((out / "meta.json").read_text())
    meta.update(
        eos_ids=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        chat_template="chatml",
        added_tokens=["<|im_start|>", "<|im_end|>"],
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def run(pkg: Path, *args, stdin: str = "", script: str = "generate.py") -> subprocess.CompletedProcess:
    """The package's SCRIPT with ARGS and STDIN, captured."""
    return subprocess.run(
        [sys.executable, str(pkg / script), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=pkg.parent,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama package over chat shards (the shards are its default data dir), trained one
    step: (root, package, data dir, tokenizer, run dir)."""
    root = tmp_path_factory.mktemp("generate")
    tok = train_bpe()
    data = chat_data(root / "chat", tok)
    pkg = root / "pkg"
    variables = {
        "data_dir": str(data),
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "seq_len": SEQ_LEN,
        "batch_size": 2,
        "max_steps": 1,
        "log_every": 1,
        "eval_every": 0,
        "output_dir": str(root / "run"),
    }
    build_package(compile_config(FAMILIES["llama"].template, variables=variables), pkg, smoke=False)
    trained = run(pkg, script="train.py")
    assert trained.returncode == 0, trained.stderr
    return root, pkg, data, tok, root / "run"


def package_model(pkg: Path, ckpt: Path):
    """The package's model with the weights of checkpoint CKPT, in eval mode."""
    spec = importlib.util.spec_from_file_location(f"model_{pkg.parent.name}", pkg / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    return model.eval()


def greedy(model, prompt: list[int], n: int, stop=()) -> list[int]:
    """The argmax chain from PROMPT (the model sees the last SEQ_LEN tokens), up to N tokens or
    through the first id of STOP."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids[-SEQ_LEN:]]))[0, -1].argmax())
            new.append(token)
            if token in stop:
                break
            ids.append(token)
    return new


def text_of(tok, ids, stop) -> str:
    return tok.decode([i for i in ids if i not in stop], skip_special_tokens=True)


def newest(run_dir: Path) -> Path:
    return checkpoint.find_checkpoint(run_dir)


# ---- the package ---------------------------------------------------------------------------------


def test_every_package_has_generate_py_and_vendors_what_it_reaches(setup):
    root, pkg, *_ = setup
    assert (pkg / "generate.py").is_file()
    vendored = sorted(p.relative_to(pkg / "fgc_runtime").as_posix() for p in (pkg / "fgc_runtime").rglob("*.py"))
    sources = {name: (pkg / name).read_text() for name in ("train.py", "model.py", "generate.py")}
    runtime = REPO / "runtime"
    assert vendored == closure(sources, runtime)
    # train.py reaches what it reached before; generate.py adds its sampler only
    trainer = closure({k: v for k, v in sources.items() if k != "generate.py"}, runtime)
    assert sorted(set(vendored) - set(trainer)) == ["sample.py"]
    requirements = (pkg / "requirements.txt").read_text()
    assert "# optional: jinja2 (generate.py --chat" in requirements
    assert "# optional: tokenizers (generate.py and text samples" in requirements
    # the settings it shares with train.py, and the package runs --help without fgc
    source = sources["generate.py"]
    assert f"SEQ_LEN = {SEQ_LEN}  #" in source and f"DATA_DIR = {json.dumps(str(root / 'chat'))}  #" in source
    helped = run(pkg, "--help")
    assert helped.returncode == 0 and "--chat" in helped.stdout and "--top-p" in helped.stdout


def test_greedy_generation_is_the_models_argmax_chain_streamed(setup):
    root, pkg, data, tok, run_dir = setup
    model = package_model(pkg, newest(run_dir))
    stop = eos_ids(data)
    prompt = "the quick"
    chain = greedy(model, tok.encode(prompt, add_special_tokens=False).ids, 12, stop)
    assert len(chain) == 12 and not set(chain) & set(stop)  # a whole chain, not a stop at once
    expected = text_of(tok, chain, stop)
    first = run(pkg, prompt, "--temperature", "0", "--max-new-tokens", "12")
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected + "\n"
    assert run(pkg, prompt, "--temperature", "0", "--max-new-tokens", "12").stdout == first.stdout
    # without PROMPT each line of standard input is one (blank lines ask nothing)
    other = "hello world"
    chain2 = greedy(model, tok.encode(other, add_special_tokens=False).ids, 12, stop)
    lines = run(pkg, "--temperature", "0", "--max-new-tokens", "12", stdin=f"{prompt}\n\n{other}\n")
    assert lines.returncode == 0, lines.stderr
    assert lines.stdout == expected + "\n" + text_of(tok, chain2, stop) + "\n"


def test_sampling_is_seeded(setup):
    _, pkg, *_ = setup
    args = ("hello", "--temperature", "1.5", "--top-p", "1", "--max-new-tokens", "16")
    a, b, c = run(pkg, *args, "--seed", "1"), run(pkg, *args, "--seed", "1"), run(pkg, *args, "--seed", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_generation_stops_at_any_eos_id_of_the_data(setup):
    root, pkg, data, tok, run_dir = setup
    model = package_model(pkg, newest(run_dir))
    prompt = tok.encode("the quick", add_special_tokens=False).ids
    chain = greedy(model, prompt, 12)  # no stop
    specials = {tok.token_to_id(t) for t in SPECIALS}
    k = next(i for i in range(1, len(chain)) if chain[i] not in chain[:i] and chain[i] not in specials)
    expected = tok.decode(chain[:k], skip_special_tokens=True)
    meta = json.loads((data / "meta.json").read_text())
    for name, change in (("listed", {"eos_ids": [meta["eos_id"], chain[k]]}), ("single", {"eos_id": chain[k]})):
        other = root / f"data-{name}"
        shutil.copytree(data, other)
        changed = {k2: v for k2, v in meta.items() if k2 != "eos_ids"} | change
        (other / "meta.json").write_text(json.dumps(changed))
        out = run(pkg, "the quick", "--data", other, "--temperature", "0", "--max-new-tokens", "12")
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected + "\n", name


def test_chat_applies_the_template_and_keeps_the_conversation(setup):
    root, pkg, data, tok, run_dir = setup
    model = package_model(pkg, newest(run_dir))
    stop = eos_ids(data)

    def turn(messages):
        ids = tok.encode(render_chat(CHATML, messages), add_special_tokens=False).ids
        return text_of(tok, greedy(model, ids, 8, stop), stop)

    messages = [{"role": "user", "content": "hello world"}]
    first = turn(messages)
    assert first != ""
    one = run(pkg, "--chat", "hello world", "--temperature", "0", "--max-new-tokens", "8")
    assert one.returncode == 0, one.stderr
    assert one.stdout == first + "\n"
    # interactive: each stdin line is the user's next turn, after the model's earlier replies
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "what does the fox say"}]
    second = turn(messages)
    assert second != ""
    both = run(pkg, "--chat", "--temperature", "0", "--max-new-tokens", "8", stdin="hello world\nwhat does the fox say\n")
    assert both.returncode == 0, both.stderr
    assert both.stdout == first + "\n" + second + "\n"


def test_the_runtime_renders_chat_templates_as_transformers_does(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, _, data, tok, _ = setup
    template, specials = chat_template(data)
    assert template == CHATML and specials == {"eos_token": "<|im_end|>"}
    # a template with whitespace control, the special tokens, tojson and a loop over the messages
    fancy = (
        "{%- for m in messages %}\n"
        "  {%- if m['role'] == 'system' %}[SYS {{ m['content'] | tojson }}]\n"
        "  {% else %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n"
        "  {% endif %}\n"
        "{%- endfor %}\n"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "system", "content": "be \"brief\" é"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick"},
        {"role": "user", "content": "fox?"},
    ]
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    for tpl in (CHATML, fancy):
        for gen in (True, False):
            ours = render_chat(tpl, messages, add_generation_prompt=gen, special_tokens=specials)
            theirs = hf_tok.apply_chat_template(messages, chat_template=tpl, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
    with pytest.raises(RunError) as info:
        render_chat("{{ raise_exception('no system role') }}", messages, path=data)
    assert str(info.value) == f"{data}: error: the chat template fails: no system role"


def test_errors_are_one_line_with_exit_status_2(setup, tmp_path):
    root, pkg, data, tok, run_dir = setup
    # no checkpoint
    out = run(pkg, "hi", "--output-dir", tmp_path / "fresh")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        f"{tmp_path / 'fresh' / 'checkpoints'}: error: no complete checkpoint to sample from "
        "(train first, or pass --checkpoint PATH)\n"
    )
    out = run(pkg, "hi", "--checkpoint", tmp_path / "nope")
    assert (out.returncode, out.stderr) == (2, f"{tmp_path / 'nope'}: error: no such checkpoint\n")
    # --chat with a tokenizer that has no template: how to get one
    plain = chat_data(tmp_path / "plain", tok, template=None)
    out = run(pkg, "--chat", "hi", "--data", plain)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"{plain}: error: --chat: the data's tokenizer has no chat template;")
    assert "fgc data INPUT -o DIR --tokenizer PATH --format chat --chat-template chatml" in out.stderr
    # a data dir without its tokenizer file
    (plain / "tokenizer.json").unlink()
    out = run(pkg, "hi", "--data", plain)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "error: cannot decode: the data's tokenizer is 'tokenizer.json'" in out.stderr
    # the checkpoint of another model
    other = tmp_path / "other"
    ckpt = newest(run_dir)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    state = {k: (v[:, :8] if k.endswith("embed_tokens.weight") else v) for k, v in state.items()}
    saved = checkpoint.save_checkpoint(other, step=1, model_state=state, optimizer_state={}, trainer_state={"step": 1})
    out = run(pkg, "hi", "--output-dir", other)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"{saved}: error: the checkpoint does not fit this model:")


# ---- the runtime pieces ----------------------------------------------------------------------------


def test_the_stream_decoder_holds_back_an_incomplete_character():
    decoder = StreamDecoder(ByteTokenizer())
    text = "aé€x"
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    assert pieces == ["a", "", "é", "", "", "€", "x"]
    assert decoder.flush() == ""
    cut = StreamDecoder(ByteTokenizer())
    assert [cut.push(b) for b in "é".encode()[:1]] == [""]
    assert cut.flush() == "\ufffd"  # the stream ended inside a character


def test_the_stream_decoder_gives_the_bpe_text_piece_by_piece(tmp_path):
    tok = train_bpe()
    data = chat_data(tmp_path / "d", tok)
    tokenizer, why = load_tokenizer(data)
    assert why == ""
    text = "hello world, the lazy fox é says ü"
    ids = tok.encode(text, add_special_tokens=False).ids
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 3  # it streamed, not all at the end


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    assert torch.equal(nucleus(probs, 0.7), torch.tensor([0.0, 0.5, 0.0, 0.3]))
    assert torch.equal(nucleus(probs, 0.85), torch.tensor([0.0, 0.5, 0.15, 0.3]))
    assert torch.equal(nucleus(probs, 0.1), torch.tensor([0.0, 0.5, 0.0, 0.0]))

    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return torch.log(probs).expand(ids.shape[0], ids.shape[1], 4)

    gen = torch.Generator().manual_seed(0)
    drawn = generate(Fixed(), [0], 200, context_len=4, temperature=1.0, top_p=0.7, generator=gen)
    assert set(drawn) == {1, 3}
    assert generate(Fixed(), [0], 20, context_len=4, temperature=1.0, top_p=0.1, generator=gen) == [1] * 20
    # ids past the tokenizer's vocabulary (a padded model vocabulary) are never chosen
    assert generate(Fixed(), [0], 5, context_len=4, vocab_size=1) == [0] * 5
    assert set(generate(Fixed(), [0], 50, context_len=4, temperature=1.0, generator=gen, vocab_size=3)) <= {0, 1, 2}


def test_eos_ids_of_the_data(tmp_path):
    write_token_shards(tmp_path / "a", [[1, 2]], vocab_size=10, eos_id=9, tokenizer="byte")
    assert eos_ids(tmp_path / "a") == [9] and hf.data_eos_id(tmp_path / "a") == 9
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta | {"eos_ids": [9, 4, 9]}))
    assert eos_ids(tmp_path / "a") == [9, 4] and hf.data_eos_id(tmp_path / "a") == [9, 4]
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta | {"eos_ids": "4"}))
    with pytest.raises(RunError, match="eos_ids must be a non-empty list of token ids"):
        eos_ids(tmp_path / "a")


# ---- the export ----------------------------------------------------------------------------------


def forced_state(state: dict, token: int) -> dict:
    """STATE changed so that TOKEN is the argmax at every position: the layers add nothing to the
    residual stream, every embedding's first component is positive, and the head reads only that
    component, for TOKEN only."""
    state = {k: v.clone() for k, v in state.items()}
    for name, value in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            value.zero_()
    state["model.embed_tokens.weight"][:, 0] = 1.0
    state["model.norm.weight"].fill_(1.0)
    state["lm_head.weight"].zero_()
    state["lm_head.weight"][token, 0] = 10.0
    return state


def test_export_lists_every_eos_id_and_writes_the_chat_template(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, pkg, data, tok, run_dir = setup
    im_end = tok.token_to_id("<|im_end|>")
    stop = eos_ids(data)
    assert stop == [tok.token_to_id("<|endoftext|>"), im_end]
    # final/ of the training run
    final = json.loads((run_dir / "final" / "generation_config.json").read_text())
    assert final["eos_token_id"] == stop
    # a model that always says <|im_end|>, exported with --export-hf
    state = torch.load(newest(run_dir) / "model.pt", weights_only=True)
    forced = checkpoint.save_checkpoint(
        tmp_path / "forced", step=1, model_state=forced_state(state, im_end), optimizer_state={}, trainer_state={"step": 1}
    )
    export = tmp_path / "export"
    out = run(pkg, "--export-hf", export, "--checkpoint", forced, script="train.py")
    assert out.returncode == 0, out.stderr
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == stop
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == stop
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert (export / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    # transformers: the template, then generate stops after the end of the turn
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    messages = [{"role": "user", "content": "hello world"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    expected = tok.encode(render_chat(CHATML, messages), add_special_tokens=False).ids
    assert ids[0].tolist() == expected
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert generated[0, ids.shape[1]:].tolist() == [im_end]
    # generate.py stops there too: an empty reply
    reply = run(pkg, "--chat", "hello world", "--checkpoint", forced, "--temperature", "0")
    assert (reply.returncode, reply.stdout) == (0, "\n")


# ---- the journey, with `fgc data --format chat` ------------------------------------------------------


@pytest.mark.slow
def test_a_model_taught_one_answer_gives_it_through_generate_py_and_transformers(tmp_path):
    """Chat shards made by `fgc data --format chat --chat-template chatml` from a base BPE (no
    ChatML tokens), a tiny Llama trained on them until it answers, then the same answer, ending at
    <|im_end|>, from generate.py --chat and from transformers after the export in final/."""
    transformers = pytest.importorskip("transformers")
    from conftest import run_fgc

    base = tokenizers.Tokenizer(tokenizers.models.BPE())
    base.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    base.train_from_iterator(SENTENCES * 50, trainer)
    base.save(str(tmp_path / "bpe.json"))
    conversation = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick brown fox"}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": conversation}) + "\n" for _ in range(30)))
    shards = tmp_path / "shards"
    run_fgc(
        "data", tmp_path / "chats.jsonl", "-o", shards, "--tokenizer", tmp_path / "bpe.json",
        "--format", "chat", "--chat-template", "chatml", check=True,
    )
    meta = json.loads((shards / "meta.json").read_text())
    variables = {
        "data_dir": str(shards), "vocab_size": meta["vocab_size"], "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64, "seq_len": 32,
        "batch_size": 4, "max_steps": 30, "lr": 0.01, "log_every": 10, "eval_every": 0,
        "output_dir": str(tmp_path / "run"),
    }
    pkg = tmp_path / "pkg"
    build_package(compile_config(FAMILIES["llama"].template, variables=variables), pkg, smoke=False)
    trained = run(pkg, script="train.py")
    assert trained.returncode == 0, trained.stderr
    answer = run(pkg, "--chat", "hello world", "--temperature", "0")
    assert (answer.returncode, answer.stdout) == (0, "the quick brown fox\n"), answer.stderr
    final = tmp_path / "run" / "final"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(final))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(final))
    ids = hf_tok.apply_chat_template(conversation[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert hf_tok.decode(out[0, ids.shape[1]:]) == "the quick brown fox<|im_end|>"
