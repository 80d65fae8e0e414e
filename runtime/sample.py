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

The package's ``generate.py`` samples from a checkpoint with the same pieces: :func:`generate`
(temperature and top-p, a callback per token), :class:`StreamDecoder` (each token's text as it
comes), the data's end-of-turn ids (:func:`eos_ids`) and its chat template
(:func:`chat_template`, rendered by :func:`render_chat` as transformers renders it).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from .checkpoint import chosen_checkpoint
from .data import ByteTokenizer, read_meta
from .errors import RunError

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers versions save a template
CHAT_HINT = "make chat shards with one: `fgc data INPUT -o DIR --tokenizer PATH --format chat --chat-template chatml`"


class _HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the byte tokenizer's two methods."""

    def __init__(self, tokenizer, eos_id: int):
        self._tok = tokenizer
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        """The ids of TEXT; special tokens written in it (``<|im_start|>``) are their own ids,
        and nothing is added around it (no BOS), as ``fgc data`` tokenizes."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """The text of IDS, without the end-of-text id and special tokens."""
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
    top_p: float = 1.0,
    eos_ids=(),
    on_token=None,
    vocab_size: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; return the new ones.

    Each token is the argmax of the last position's logits (``temperature == 0``), or drawn from
    ``softmax(logits / temperature)`` with ``generator`` (on the CPU, so the draw is the same on
    every device), cut to its top-p nucleus when ``top_p < 1`` (the most likely tokens whose
    probabilities sum to at least ``top_p``). The model sees at most the last ``context_len``
    tokens. Generation stops after ``eos_id`` or any id of ``eos_ids`` (that token is the last one
    returned). ``on_token(token)`` is called with each new token as soon as it is chosen. With
    ``vocab_size``, only ids below it are chosen (a model's vocabulary may be padded beyond its
    tokenizer's). The model is put in eval mode and back in the mode it was in.
    """
    stop = set(eos_ids) | ({eos_id} if eos_id is not None else set())
    was_training = model.training
    model.eval()
    try:
        ids_1T = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits_V = model(ids_1T[:, -context_len:])[0, -1].float()
            if vocab_size is not None:
                logits_V = logits_V[:vocab_size]
            if temperature == 0:
                token = int(logits_V.argmax())
            else:
                probs_V = torch.softmax(logits_V / temperature, dim=-1).cpu()
                if top_p < 1:
                    probs_V = nucleus(probs_V, top_p)
                token = int(torch.multinomial(probs_V, 1, generator=generator))
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop:
                break
            ids_1T = torch.cat([ids_1T, torch.tensor([[token]], device=ids_1T.device)], dim=1)
        return new
    finally:
        model.train(was_training)


def nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """PROBS_V with every token outside its top-p nucleus set to 0: the most likely tokens, in
    order, until their probabilities sum to at least TOP_P (the most likely one always stays)."""
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    before_V = torch.cumsum(sorted_V, dim=0) - sorted_V  # the mass of the tokens ranked above
    sorted_V = torch.where(before_V < top_p, sorted_V, torch.zeros_like(sorted_V))
    sorted_V[0] = sorted_V[0].clamp_min(torch.finfo(sorted_V.dtype).tiny)
    return torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)


class StreamDecoder:
    """The text of a stream of token ids, piece by piece: :meth:`push` gives the text a new token
    adds. A token may end inside a character (a byte of a multi-byte UTF-8 character, a byte-level
    BPE piece) or change how the tokens before it decode: the text of the last tokens is decoded
    again with a few tokens before them as context, and held back while it ends in an incomplete
    character (U+FFFD), so the pieces joined are the decoded text of the whole stream."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # context tokens start here
        self._read = 0  # the text of the tokens before this index has been given out

    def push(self, token: int) -> str:
        """The new text once TOKEN is added ("" while it is held back)."""
        self.ids.append(int(token))
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """The text held back (an incomplete character at the end of the stream decodes as is)."""
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :]


def eos_ids(data_dir) -> list[int]:
    """The ids that end a generation for the data of DATA_DIR: ``meta.json``'s ``eos_ids`` (every
    id that ends a turn or a text, in chat shards), else its ``eos_id``."""
    meta = read_meta(data_dir)
    ids = meta.get("eos_ids")
    if ids is None:
        return [meta["eos_id"]]
    valid = isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    if not valid:
        raise RunError(f"eos_ids must be a non-empty list of token ids, got {ids!r}", path=Path(data_dir) / "meta.json")
    return list(dict.fromkeys(ids))


def _token_text(value) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an AddedToken's ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template(data_dir) -> tuple[str | None, dict[str, str]]:
    """The chat template of the tokenizer in DATA_DIR, and the special tokens a template may use
    (``bos_token``, ``eos_token``, ...): ``chat_template.jinja`` when there is one (transformers
    takes it first too), else the ``chat_template`` of ``tokenizer_config.json`` (its ``default``
    one when it names several, else the first); None when there is none."""
    data_dir = Path(data_dir)
    path = data_dir / TOKENIZER_CONFIG
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunError(f"cannot read it: {err}", path=path) from None
        if not isinstance(config, dict):
            raise RunError("expected a JSON object", path=path)
    specials = {k: t for k, v in sorted(config.items()) if k.endswith("_token") and (t := _token_text(v)) is not None}
    if (data_dir / CHAT_TEMPLATE_FILE).is_file():  # it wins, as in transformers
        template = (data_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers saves several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise RunError(f"chat_template must be a string, got {type(template).__name__}", path=path)
    return template or None, specials


def render_chat(
    template: str, messages: list[dict], *, add_generation_prompt: bool = True, special_tokens=None, path=None
) -> str:
    """MESSAGES (``[{"role", "content"}, ...]``) rendered with the chat TEMPLATE as transformers'
    ``apply_chat_template`` renders it: a sandboxed jinja2 environment with ``trim_blocks`` and
    ``lstrip_blocks``, its ``tojson``, ``raise_exception`` and ``strftime_now``, the special
    tokens as variables, and ``add_generation_prompt`` (the assistant turn's opening). A template
    that fails is a RunError naming PATH (where the template came from)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RunError("a chat template needs the `jinja2` package (pip install jinja2)") from None

    class Generation(Extension):
        # transformers' {% generation %} marks the assistant's text for its masks: here it renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except jinja2.TemplateError as err:
        raise RunError(f"the chat template fails: {err}", path=path) from None


def checkpoint_to_sample(arg: str | None, output_dir) -> Path:
    """The checkpoint ``generate.py`` samples from: ``--checkpoint PATH`` (an error unless it
    verifies), else the newest complete one in OUTPUT_DIR that verifies."""
    return chosen_checkpoint(arg, output_dir, purpose="sample from", doing="sampling from")


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load the checkpoint's model state STATE (from PATH) into MODEL; a state that does not fit
    (another model's checkpoint) is a RunError naming PATH."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise RunError(f"the checkpoint does not fit this model: {first}", path=path) from None


def pick_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda``: auto is cuda when a CUDA device is there, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def stream_reply(model, tokenizer, prompt_ids, *, out=None, **kwargs) -> list[int]:
    """:func:`generate` from PROMPT_IDS (KWARGS are its options), writing each token's text to OUT
    (default: standard output) as it comes, without the end-of-text/turn token; returns the new
    ids."""
    out = out if out is not None else sys.stdout
    decoder = StreamDecoder(tokenizer)
    stop = set(kwargs.get("eos_ids", ()))

    def show(token: int) -> None:
        if token not in stop:
            out.write(decoder.push(token))
            out.flush()

    new = generate(model, prompt_ids, on_token=show, **kwargs)
    out.write(decoder.flush())
    out.flush()
    return new


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
