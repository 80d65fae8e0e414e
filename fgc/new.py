"""``fgc new NAME``: a project to start from, that builds and trains as it is written.

    NAME/
      meta.yaml            the project: its name, and train.yaml as its default config
      configs/train.yaml   a small Llama over fgc's template library, every knob a -D away
      data/corpus.txt      a little text to train on, until you put yours there
      README.md            the commands
      .gitignore           build/ and output/

The directory is written beside itself and renamed into place, so a failure leaves nothing;
NAME must not exist yet (or be an empty directory).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from .errors import FgcError, Location

META = """\
## The project `{name}`: `fgc ls` lists its configs, `fgc build -p . train.yaml -o build/` builds one.
name: {name_yaml}
description: "A language model trained with fgc"
default_config: train.yaml
"""

CONFIG = """\
## A small Llama trained from scratch on data/corpus.txt (replace it with your text).
##
##   fgc build configs/train.yaml -o build/
##   python build/train.py
##
## Everything comes from fgc's template library; this file sets the defaults of the knobs, and
## each can be changed from the command line (-D hidden_size=256) or here. `fgc explain
## configs/train.yaml` shows what it builds; `-D family=qwen3` picks another model family.
-- set family = family | default("llama")
-- extends "lm/" ~ family ~ ".yaml"

[config_metadata]
== super()
-- set ns.hidden_size = hidden_size | default(64)
-- set ns.num_hidden_layers = num_hidden_layers | default(2)
-- set ns.num_attention_heads = num_attention_heads | default(4)
-- set ns.intermediate_size = intermediate_size | default(176)
-- set ns.seq_len = seq_len | default(64)
-- set ns.batch_size = batch_size | default(8)
-- set ns.max_steps = max_steps | default(100)
-- set ns.warmup_steps = warmup_steps | default(10)
-- set ns.lr = lr | default(3.0e-3)
-- set ns.trainer_type = trainer_type | default("basic")
-- set ns.log_every = log_every | default(10)
-- set ns.eval_every = eval_every | default(50)

[data]
.data: &data !singleton:fgc.settings:DataSettings@data
    text_files: [../data/corpus.txt]
    val_fraction: 0.1
"""

README = """\
# {name}

A project made by `fgc new`: a small Llama (`configs/train.yaml`) trained from scratch on
`data/corpus.txt`, a little generated text to replace with your own.

    fgc ls                                        # the configs, each checked
    fgc build configs/train.yaml -o build/        # the package
    python build/train.py                         # train (output/: metrics.jsonl, checkpoints/, final/)
    fgc build configs/train.yaml -o build/ -D hidden_size=128 -D max_steps=500

For several processes, `-D trainer_type=ddp` and `torchrun --nproc-per-node 2 build/train.py`.
Another config of the project can extend this one: `-- extends "train.yaml"`.
"""

GITIGNORE = "build/\noutput/\n"

SUBJECTS = "the engineer|a student|my neighbour|the old captain|a small robot|the baker".split("|")
ACTIONS = "writes a letter|reads the map|fixes the radio|plants a tree|counts the stars|paints the door".split("|")
WHEN = "every morning|after lunch|when it rains|before the train leaves|on quiet evenings".split("|")


def corpus(seed: int = 7, paragraphs: int = 240) -> str:
    """Simple sentences a small model learns in a minute, the same every time."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(ACTIONS)} {rng.choice(WHEN)}."
            for _ in range(rng.randint(2, 5))
        ]
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def new_project(path: Path) -> Path:
    """Write the scaffold into PATH (missing, or an empty directory); returns PATH."""
    name = path.resolve().name
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FgcError("already exists: fgc new makes a new directory (or fills an empty one)", Location(str(path)))
    if not path.resolve().parent.is_dir():
        raise FgcError("its parent directory does not exist", Location(str(path)))
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise FgcError(
            "a project's name is letters, digits, '.', '_' and '-' (not starting with '.')", Location(str(path))
        )
    files = {
        "meta.yaml": META.format(name=name, name_yaml=_yaml_string(name)),
        "configs/train.yaml": CONFIG,
        "data/corpus.txt": corpus(),
        "README.md": README.format(name=name),
        ".gitignore": GITIGNORE,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.resolve().parent))
    try:
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text, encoding="utf-8")
        if path.exists():  # an empty directory: fill it
            for entry in staging.iterdir():
                os.replace(entry, path / entry.name)
            staging.rmdir()
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _yaml_string(text: str) -> str:
    """TEXT as a double-quoted YAML scalar (JSON's escaping is valid YAML)."""
    import json

    return json.dumps(text)
