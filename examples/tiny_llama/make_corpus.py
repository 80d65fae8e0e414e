"""Write corpus.txt: simple English-like paragraphs from a small grammar, the same every time.

The text is made here, not downloaded, so the main example trains offline. A small grammar gives
a byte-level model structure it can learn in a few minutes on a CPU: the loss falls clearly.

    python examples/tiny_llama/make_corpus.py   # rewrites corpus.txt beside this file
"""

import random
from pathlib import Path

ADJECTIVES = "red small quiet old bright young tired clever green brave".split()
NOUNS = "fox bird cat farmer child dog teacher river boat garden".split()
PLURALS = {"child": "children", "fox": "foxes", "boat": "boats"}
VERBS = "sees follows finds helps watches paints meets calls".split()
PLACES = "near the river|in the garden|under the old bridge|by the quiet lake|on the hill".split("|")
TIMES = "In the morning|At night|After the rain|Every day|On Sunday".split("|")


def noun_phrase(rng):
    noun = rng.choice(NOUNS)
    if rng.random() < 0.5:
        return f"the {rng.choice(ADJECTIVES)} {noun}"
    return f"the {noun}"


def sentence(rng):
    kind = rng.random()
    if kind < 0.5:
        text = f"{noun_phrase(rng)} {rng.choice(VERBS)} {noun_phrase(rng)} {rng.choice(PLACES)}"
    elif kind < 0.8:
        text = f"{rng.choice(TIMES).lower()}, {noun_phrase(rng)} {rng.choice(VERBS)} {noun_phrase(rng)}"
    else:
        count = rng.randint(2, 9)
        noun = rng.choice(NOUNS)
        text = f"there are {count} {PLURALS.get(noun, noun + 's')} {rng.choice(PLACES)}"
    return text[0].upper() + text[1:] + "."


def paragraph(rng):
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))


def main():
    rng = random.Random(1234)
    paragraphs = [paragraph(rng) for _ in range(700)]
    out = Path(__file__).with_name("corpus.txt")
    out.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"wrote {out}: {out.stat().st_size} bytes, {len(paragraphs)} paragraphs")


if __name__ == "__main__":
    main()
