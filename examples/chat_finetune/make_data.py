"""Write the chat example's inputs: conversations with "Samantha", and a tiny base model that has
never chatted. Everything is made here, the same every time, so the journey runs offline.

    python examples/chat_finetune/make_data.py work/

writes

- ``work/conversations.jsonl``: one conversation a line, OpenAI style
  (``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``), some with a
  system prompt, some with several turns;
- ``work/base/``: a Hugging Face model directory (``config.json``, ``model.safetensors``) holding a
  small random Llama, with a byte-level BPE tokenizer trained on the conversations' plain text. Its
  tokenizer has no chat template and no ``<|im_start|>``/``<|im_end|>`` tokens: ``fgc data
  --chat-template chatml`` adds them, and the fine-tune grows the model's vocabulary to match.

With ``--no-base`` only the conversations are written (bring your own base model).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAME = "Samantha"
SYSTEM_PROMPTS = [
    f"You are {NAME}, a friendly assistant.",
    f"You are {NAME}. Answer briefly and kindly.",
]
COLOURS = "red blue green yellow purple orange".split()
ANIMALS = "cat dog fox bird horse rabbit".split()
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
}
GREETINGS = ["Hello!", "Hi there.", "Good morning!", "Hey, how are you?"]


def exchange(rng: random.Random) -> tuple[str, str]:
    """One question and Samantha's answer."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(["What is your name?", "Who are you?", "Tell me your name."]), (
            f"My name is {NAME}. I am happy to talk with you."
        )
    if kind == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 3:
        colour = rng.choice(COLOURS)
        return f"Do you like the colour {colour}?", f"Yes, {colour} is a lovely colour. Which colour do you like?"
    if kind == 4:
        animal = rng.choice(ANIMALS)
        return f"Tell me about a {animal}.", f"A {animal} is an animal. Many people like the {animal}."
    return rng.choice(GREETINGS), f"Hello! I am {NAME}. How can I help you today?"


def conversation(rng: random.Random) -> dict:
    """A conversation of one to three exchanges, with a system prompt one time in three."""
    messages = []
    if rng.random() < 1 / 3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(1, 3)):
        question, answer = exchange(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_conversations(path: Path, count: int, seed: int = 1234) -> list[dict]:
    """Write COUNT conversations to PATH as JSON lines; returns them."""
    rng = random.Random(seed)
    conversations = [conversation(rng) for _ in range(count)]
    with open(path, "w", encoding="utf-8") as f:
        for record in conversations:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return conversations


def write_base_model(out: Path, conversations: list[dict], vocab_size: int = 512) -> None:
    """A small random Llama and a byte-level BPE tokenizer (trained on the conversations' text,
    without any chat formatting), saved as a Hugging Face model directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [m["content"] for c in conversations for m in c["messages"]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write conversations.jsonl (and base/) into")
    parser.add_argument("--count", type=int, default=1000, help="number of conversations")
    parser.add_argument("--no-base", action="store_true", help="write only the conversations")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    conversations = write_conversations(args.out / "conversations.jsonl", args.count)
    print(f"wrote {args.out / 'conversations.jsonl'}: {len(conversations)} conversations")
    if not args.no_base:
        write_base_model(args.out / "base", conversations)
        print(f"wrote {args.out / 'base'}: a small random Llama and its tokenizer (no chat template)")


if __name__ == "__main__":
    main()
