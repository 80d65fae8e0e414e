"""Chat data for ``fgc data --format chat``: conversations, chat templates and loss masks.

A conversation is a record's ``messages`` (OpenAI style: ``{"role", "content"}``) or
``conversations`` (ShareGPT style: ``{"from", "value"}`` with ``human``/``gpt``/``system``).
It is rendered with the tokenizer's chat template exactly as transformers renders it: the
template is installed in a tokenizer directory (tokenizer.json + tokenizer_config.json with
``chat_template``) that transformers' ``AutoTokenizer`` loads, and its ``apply_chat_template``
renders; the text is then encoded by the same tokenizer without added special tokens, which is
what ``apply_chat_template(..., tokenize=True)`` does. So the ids in the shards are the ids
transformers gives for the conversation.

The loss mask marks what the model must learn to write: for each assistant message, the tokens
from the end of the generation prompt (the rendering of the conversation before it with
``add_generation_prompt=True``) through its content up to and including the first special token
after the content (the token that ends its turn, e.g. ``<|im_end|>``). Spans are found in
characters by rendering prefixes of the conversation, then mapped to tokens through the
tokenizer's offsets. For a template whose rendering of a prefix is not a prefix of the whole
rendering (some drop earlier reasoning, for example), each message's content is searched for in
order in the rendering instead.
"""

from __future__ import annotations

import bisect
import json
from importlib import resources
from pathlib import Path

from fgc.errors import FgcError, Location

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
BUNDLED_TEMPLATES = ("chatml",)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# A conversation rendered once to find the tokens that end turns and check the separator.
PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye"},
]


class RecordError(Exception):
    """A problem with one conversation: MESSAGE, reported by the caller with its file and record."""


def bundled_template(name: str) -> str:
    """The text of a template shipped with fgc (``chatml``)."""
    text = (
        resources.files("fgc")
        .joinpath("chat_templates", f"{name}.jinja")
        .read_text("utf-8")
    )
    return text[:-1] if text.endswith("\n") else text


def tokenizer_template(directory: Path | None) -> str | None:
    """The chat template a tokenizer directory carries, read as the generated packages read it
    (``fgc_runtime.sample.chat_template``: ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template``); None without one.
    """
    if directory is None:
        return None
    from fgc_runtime.errors import RunError
    from fgc_runtime.sample import chat_template

    try:
        template, _ = chat_template(directory)
    except RunError as err:
        raise FgcError(err.message, loc=Location(file=err.path or str(directory))) from None
    return template


def read_config(directory: Path | None) -> dict:
    """A tokenizer directory's tokenizer_config.json ({} when it has none)."""
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return {}
    path = directory / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise FgcError(f"not valid JSON: {err}", loc=Location(file=str(path))) from None
    if not isinstance(data, dict):
        raise FgcError("expected a JSON object", loc=Location(file=str(path)))
    return data


def resolve_template(
    option: str | None, directory: Path | None, tokenizer_spec: str
) -> tuple[str, bool]:
    """The chat template to use and whether it is installed (``--chat-template`` given).

    OPTION is ``chatml``, a Jinja file, or None: the tokenizer's own template, an error with a
    hint when it has none.
    """
    if option is None:
        template = tokenizer_template(directory)
        if template is None:
            raise FgcError(
                "the tokenizer has no chat template",
                loc=Location(file=tokenizer_spec),
                hint="install one with --chat-template chatml (or --chat-template FILE.jinja)",
            )
        return template, False
    if option in BUNDLED_TEMPLATES:
        return bundled_template(option), True
    path = Path(option)
    if not path.is_file():
        raise FgcError(
            "no such chat template file",
            loc=Location(file=option),
            hint="--chat-template takes "
            + ", ".join(BUNDLED_TEMPLATES)
            + " or a Jinja file",
        )
    try:
        return path.read_text(encoding="utf-8"), True
    except UnicodeDecodeError as err:
        raise FgcError(
            f"not valid UTF-8 text: invalid byte at offset {err.start}",
            loc=Location(file=option),
        ) from None


def conversation(record: dict, *, strict_keys: bool = True) -> list[dict]:
    """The messages (``role``, ``content``) of a record; RecordError on a missing field, an
    unknown role, a message that is not a mapping or content that is not text, or no message.
    """
    messages = record.get("messages")
    style = "messages"
    if messages is None:
        messages = record.get("conversations")
        style = "conversations"
    if messages is None:
        raise RecordError(
            'has neither "messages" (OpenAI style) nor "conversations" (ShareGPT style)'
        )
    if not isinstance(messages, (list, tuple)):
        raise RecordError(
            f'"{style}" must be a list of messages, got {type(messages).__name__}'
        )
    if not messages:
        raise RecordError("empty conversation")
    out = []
    role_key, text_key = (
        ("role", "content") if style == "messages" else ("from", "value")
    )
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RecordError(
                f"message {number} must be a mapping, got {type(message).__name__}"
            )
        role, content = message.get(role_key), message.get(text_key)
        if role is None:
            raise RecordError(f'message {number} has no "{role_key}"')
        if style == "messages":
            if role not in ROLES:
                raise RecordError(
                    f"message {number}: unknown role {role!r} (expected {', '.join(ROLES)})"
                )
        else:
            if role not in SHAREGPT_ROLES:
                raise RecordError(
                    f"message {number}: unknown role {role!r} (expected {', '.join(SHAREGPT_ROLES)})"
                )
            role = SHAREGPT_ROLES[role]
        if not isinstance(content, str):
            what = "no" if content is None else f"a {type(content).__name__} as"
            raise RecordError(
                f'message {number} has {what} "{text_key}" (expected text)'
            )
        out.append({"role": role, "content": content})
    return out


def add_template_tokens(tokenizer, template: str) -> list[str]:
    """Add ``<|im_start|>``/``<|im_end|>`` to TOKENIZER (a ``tokenizers.Tokenizer``) as special
    tokens, those the template uses and the vocabulary lacks; return the ones added, in order.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = [t for t in CHATML_TOKENS if t in template and t not in vocab]
    if added:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in added]
        )
    return added


def write_chat_tokenizer(
    tokenizer, config: dict, eos_token: str, template: str, out: Path
) -> None:
    """Write TOKENIZER (tokenizer.json) and its tokenizer_config.json (CONFIG with the template as
    ``chat_template`` and the eos token) into OUT, loadable by transformers' AutoTokenizer.
    """
    tokenizer.save(str(out / "tokenizer.json"))
    config = dict(config)
    config.setdefault("eos_token", eos_token)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config["chat_template"] = template
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        # transformers rebuilds added tokens from this table when it is there: list every one
        for index, token in sorted(tokenizer.get_added_tokens_decoder().items()):
            decoder.setdefault(
                str(index),
                {
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "normalized": token.normalized,
                    "rstrip": token.rstrip,
                    "single_word": token.single_word,
                    "special": token.special,
                },
            )
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )


class ChatEncoder:
    """Renders and encodes conversations with a tokenizer directory's chat template (through
    transformers' AutoTokenizer) and computes their loss masks."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self.auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.backend = self.auto.backend_tokenizer
        self.special_ids = {
            i for i, t in self.backend.get_added_tokens_decoder().items() if t.special
        }
        self.separator_id: int | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for MESSAGES; RecordError when the template fails."""
        try:
            return self.auto.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja2 errors and the template's own raise_exception
            message = (
                str(err).strip().splitlines()[0]
                if str(err).strip()
                else type(err).__name__
            )
            raise RecordError(
                f"the chat template fails to render it: {message}"
            ) from None

    def _spans(
        self, messages: list[dict], text: str
    ) -> list[tuple[int, int, int, bool]]:
        """``(start, content_end, region_end, whole_region)`` in characters of TEXT for each
        assistant message: the targets run from START to the first special token at or after
        CONTENT_END in the region (included); without one, to REGION_END when WHOLE_REGION (the
        region is what the template renders for the message) else to CONTENT_END."""
        spans = []
        cursor = 0
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] != "assistant":
                found = text.find(content, cursor) if content else -1
                cursor = found + len(content) if found >= 0 else cursor
                continue
            span = None
            try:
                prefix = self.render(messages[:i], True)
            except RecordError:
                prefix = (
                    None  # some templates refuse a conversation without a user turn
                )
            if prefix is not None:
                whole = self.render(messages[: i + 1], False)
                if (
                    whole.startswith(prefix)
                    and text.startswith(whole)
                    and len(prefix) >= cursor
                ):
                    start, end = len(prefix), len(whole)
                    span = (start, _content_end(text, content, start, end), end, True)
            if span is None:
                found = text.find(content, cursor)
                if found < 0 and content.strip():
                    found = text.find(content.strip(), cursor)
                    content = content.strip()
                if found < 0:
                    raise RecordError(
                        f"cannot find assistant message {i + 1} in the rendered conversation "
                        "(the chat template neither renders prefixes as prefixes nor the content verbatim)"
                    )
                end = found + len(content)
                following = [m["content"] for m in messages[i + 1 :] if m["content"]]
                region_end = text.find(following[0], end) if following else -1
                span = (found, end, region_end if region_end >= 0 else len(text), False)
            spans.append(span)
            cursor = span[1]
        return spans

    def encode(
        self, conversations: list[list[dict]]
    ) -> list[tuple[list[int], bytes, int | None]]:
        """``(ids, mask, turn_end_id)`` of each conversation; RecordError carries ``index`` (its
        place in CONVERSATIONS)."""
        texts, all_spans = [], []
        for index, messages in enumerate(conversations):
            try:
                text = self.render(messages, False)
                all_spans.append(self._spans(messages, text))
            except RecordError as err:
                err.index = index
                raise
            texts.append(text)
        out = []
        for index, (encoding, spans) in enumerate(
            zip(self.backend.encode_batch(texts, add_special_tokens=False), all_spans)
        ):
            ids, offsets = encoding.ids, encoding.offsets
            mask = bytearray(len(ids))
            ender = None
            ends = [b for _, b in offsets]  # non-decreasing, like the starts
            for start, content_end, region_end, whole_region in spans:
                stop = (
                    region_end if whole_region else content_end
                )  # the end of the targets
                # the first token that ends after START: tokens overlapping the span are the
                # ones the model writes
                first = bisect.bisect_right(ends, start)
                for j in range(first, len(ids)):
                    a, b = offsets[j]
                    if a >= region_end:
                        break
                    if a >= content_end and ids[j] in self.special_ids:
                        stop, ender = b, ids[j]
                        break
                for j in range(first, len(ids)):
                    if offsets[j][0] >= stop:
                        break
                    mask[j] = 1
            if self.separator_id is not None and self.separator_id in ids[:-1]:
                err = RecordError(
                    f"the document separator (id {self.separator_id}) occurs inside the conversation, "
                    "so document masking would split it"
                )
                err.index = index
                raise err
            out.append((ids, bytes(mask), ender))
        return out

    def turn_end_ids(self) -> set[int]:
        """The special tokens that end the assistant's turns of a probe conversation."""
        try:
            return {ender for _, _, ender in self.encode([PROBE]) if ender is not None}
        except RecordError:
            return (
                set()
            )  # a template that refuses the probe: the data's own turns still count

    def probe_ids(self) -> list[int] | None:
        """The ids of the probe conversation (None when the template refuses it)."""
        try:
            return self.backend.encode(
                self.render(PROBE, False), add_special_tokens=False
            ).ids
        except RecordError:
            return None


def _content_end(text: str, content: str, start: int, end: int) -> int:
    """Where CONTENT (or its stripped form, as templates that trim render it) ends in
    TEXT[start:end]; START when it is not there (the targets then run to the first special token).
    """
    for candidate in (content, content.strip()):
        if candidate:
            found = text.find(candidate, start, end)
            if found >= 0:
                return found + len(candidate)
    return start


# --- the worker processes of a parallel run -------------------------------------------------------

_WORKER: ChatEncoder | None = None


def worker_init(directory: str, separator_id: int | None) -> None:
    """Initializer of a worker process: its own ChatEncoder for the tokenizer in DIRECTORY."""
    global _WORKER
    _WORKER = ChatEncoder(Path(directory))
    _WORKER.separator_id = separator_id


def worker_encode(conversations: list[list[dict]]):
    """Encode CONVERSATIONS in a worker: ``("ok", results)`` or ``("error", index, message)``
    (plain data: exceptions need not survive pickling)."""
    try:
        return ("ok", _WORKER.encode(conversations))
    except RecordError as err:
        return ("error", getattr(err, "index", 0), str(err))
