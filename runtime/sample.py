"""Text samples during training: a prompt, continued by the model, decoded, printed and appended
to ``OUTPUT_DIR/samples.jsonl`` as ``{"step", "prompt", "text"}``.

Sampling never touches the global random state: greedy decoding (temperature 0) draws nothing,
and a temperature above 0 draws from its own ``torch.Generator`` seeded with ``seed + step``. So
a run with samples takes the same training steps as one without, and resuming stays bitwise
exact; the sample at a step is the same in a resumed run as in an uninterrupted one.

The tokenizer comes from the token-shard directory: the built-in byte tokenizer when
``meta.json`` says ``"tokenizer": "byte"``; otherwise ``DATA_DIR/tokenizer.json`` (which
``fgc data --tokenizer PATH`` copies there, and names in ``meta.json`` as
``"tokenizer": "tokenizer.json"``), read with the ``tokenizers`` package when that is installed
(see :func:`load_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import ByteTokenizer, read_meta
from .errors import RunError


class _HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the byte tokenizer's two methods."""

    def __init__(self, tokenizer, eos_id: int):
        self._tok = tokenizer
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True)


def load_tokenizer(data_dir) -> tuple[object | None, str]:
    """The tokenizer of a token-shard directory, and a reason when there is none.

    Returns ``(tokenizer, "")`` or ``(None, why)``: a directory whose tokenizer is not ``byte``
    and that holds no tokenizer file, or when the ``tokenizers`` package is not installed.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta.get("tokenizer") == "byte":
        return ByteTokenizer(), ""
    path = data_dir / "tokenizer.json"
    if not path.is_file():
        return None, f"the data's tokenizer is {meta.get('tokenizer')!r} and {path} does not exist"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None, f"decoding with {path} needs the `tokenizers` package (pip install tokenizers)"
    try:
        return _HFTokenizer(Tokenizer.from_file(str(path)), meta["eos_id"]), ""
    except Exception as err:  # the tokenizers library raises its own exception types
        raise RunError(f"cannot read the tokenizer: {err}", path=path) from None


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    context_len: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; return the new ones.

    Each token is the argmax of the last position's logits (``temperature == 0``), or drawn from
    ``softmax(logits / temperature)`` with ``generator`` (on the CPU, so the draw is the same on
    every device). The model sees at most the last ``context_len`` tokens. Generation stops after
    ``eos_id``. The model is put in eval mode and back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    try:
        ids_1T = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits_V = model(ids_1T[:, -context_len:])[0, -1].float()
            if temperature == 0:
                token = int(logits_V.argmax())
            else:
                probs_V = torch.softmax(logits_V / temperature, dim=-1).cpu()
                token = int(torch.multinomial(probs_V, 1, generator=generator))
            new.append(token)
            if token == eos_id:
                break
            ids_1T = torch.cat([ids_1T, torch.tensor([[token]], device=ids_1T.device)], dim=1)
        return new
    finally:
        model.train(was_training)


class TextSampler:
    """Samples of one run: the prompt encoded once, one sample per :meth:`sample` call.

    Every rank calls :meth:`sample` (a sharded model needs every rank in its forward); only the
    one made with ``write=True`` (rank 0) appends to ``OUTPUT_DIR/samples.jsonl``.
    """

    def __init__(
        self,
        tokenizer,
        output_dir,
        *,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        context_len: int,
        write: bool = True,
    ):
        if temperature < 0:
            raise RunError(f"the sample temperature must be 0 or more, got {temperature}")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompt_ids = tokenizer.encode(prompt)
        if not self.prompt_ids:
            raise RunError(f"the sample prompt {prompt!r} encodes to no tokens")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.context_len = context_len
        self.path = Path(output_dir) / "samples.jsonl"
        self.write = write

    def sample(self, model: torch.nn.Module, step: int, device) -> dict:
        """Generate one sample with ``model`` at ``step``; returns ``{"step", "prompt", "text"}``
        (and appends it to ``samples.jsonl`` when writing)."""
        generator = torch.Generator().manual_seed(self.seed + step)
        new = generate(
            model,
            self.prompt_ids,
            self.max_new_tokens,
            context_len=self.context_len,
            temperature=self.temperature,
            generator=generator,
            eos_id=getattr(self.tokenizer, "eos_id", None),
            device=device,
        )
        record = {"step": int(step), "prompt": self.prompt, "text": self.tokenizer.decode(new)}
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record
