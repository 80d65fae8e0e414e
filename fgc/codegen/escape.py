"""Escaping: the one way text (names, paths, config strings) reaches generated files.

A config's folder and file names, template paths, ``-D`` text, ``text_files`` entries and target
names are data: written into generated Python, shell or Markdown, they must stay data. Each target
language has one function here, and the codegen templates use them as jinja filters (see
:data:`FILTERS`); ``tests/test_safety_codegen.py`` fails on any ``{{ ... }}`` in a codegen template
that prints without one. Every function is pure: the same text gives the same bytes.

- :func:`python_literal`: a Python expression whose value is the given value (strings as ``'...'``).
- :func:`python_identifier`: a valid Python name made from any text (``model.layer`` → ``model_layer``).
- :func:`python_comment`: text for the rest of a ``#`` comment line.
- :func:`python_docstring`: text for the inside of a ``\"\"\"`` docstring (or any non-raw string).
- :func:`shell_word`: one shell word (POSIX quoting).
- :func:`shell_comment`: text for the rest of a shell ``#`` comment line.
- :func:`markdown_text` and :func:`markdown_code`: one line of Markdown text, or an inline code span.
"""

from __future__ import annotations

import keyword
import re
import shlex
import unicodedata

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Markdown characters that could open a construct swallowing the text after the name (code span,
# emphasis, link, HTML tag or entity, table cell, strikethrough, math)
_MARKDOWN_SPECIAL = frozenset("\\`*_[]<>&|~$")


def _escape_char(char: str) -> str:
    """A Python escape sequence for one character (as ``repr`` writes it)."""
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    if point < 0x10000:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def _one_line(text: str, quoted: str = "") -> str:
    """TEXT with every backslash doubled, every character in QUOTED backslash-escaped, and every
    character that is not printable (line breaks of any kind, control and format characters,
    lone surrogates) written as a Python escape sequence: the result is one line of printable
    characters from which TEXT can be read back exactly."""
    out = []
    for char in text:
        if char == "\\" or char in quoted:
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(_escape_char(char))
    return "".join(out)


def python_literal(value) -> str:
    """Python source for a literal whose value is VALUE (None, bool, int, float, str, and lists,
    tuples and dicts of those), as libcst prints it: strings come out as ``repr`` writes them."""
    from .emit import code, literal  # emit uses this module: imported when first needed

    return code(literal(value))


def python_identifier(text: str) -> str:
    """A Python name made from TEXT: NFKC-normalised (as Python reads names), each run of
    characters that cannot be part of a name becomes ``_``, leading and trailing ``_`` are
    dropped (``value`` if nothing is left), a leading digit gets a ``_`` in front and a keyword a
    ``_`` behind. The result always satisfies ``str.isidentifier()`` and is never a keyword."""
    text = unicodedata.normalize("NFKC", str(text))
    kept = "".join(c if ("_" + c).isidentifier() else "\0" for c in text)
    name = re.sub("\0+", "_", kept).strip("_") or "value"
    if not name[0].isidentifier():  # a digit, or a mark that cannot start a name
        name = "_" + name
    return name + "_" if keyword.iskeyword(name) else name


def is_python_name(text: str) -> bool:
    """Whether TEXT can be written as a Python name just as it is (a keyword argument's name): an
    identifier, not a keyword, not ``__debug__``, and NFKC-normal (else Python reads another name)."""
    return (
        text.isidentifier()
        and not keyword.iskeyword(text)
        and text != "__debug__"
        and unicodedata.normalize("NFKC", text) == text
    )


def python_comment(text) -> str:
    """TEXT for the rest of a Python ``#`` comment: one line (line breaks, control and format
    characters written as ``\\n``, ``\\x00``, ``\\u2028``, ...) with backslashes doubled, so
    nothing after the comment's line is touched and the text reads back exactly."""
    return _one_line(str(text))


def python_docstring(text) -> str:
    """TEXT for the inside of a ``\"\"\"...\"\"\"`` docstring (any non-raw Python string): as
    :func:`python_comment`, and both quote characters are backslash-escaped, so the text can
    neither close the string nor end next to its closing quotes; the string's value holds TEXT
    exactly where it is placed."""
    return _one_line(str(text), quoted="\"'")


def shell_word(text) -> str:
    """TEXT as one shell word (``shlex.quote``): the shell reads it back exactly, expanding and
    running nothing in it."""
    return shlex.quote(str(text))


def shell_comment(text) -> str:
    """TEXT for the rest of a shell ``#`` comment: one line, as :func:`python_comment` (a shell
    comment ends at the first newline; the rest of the line is never expanded or run)."""
    return _one_line(str(text))


def markdown_text(text) -> str:
    """TEXT as one line of Markdown inline text: as :func:`python_comment`, and the characters that
    open an inline construct (`` ` * _ [ ] < > & | ~ $ ``; ``_`` only outside a word)
    backslash-escaped, so it renders as the text itself and leaves the rest of the page as it was."""
    line = _one_line(str(text))
    out = []
    for i, char in enumerate(line):
        # an underscore between letters or digits opens no emphasis (tiny_llama stays as it is)
        intraword = char == "_" and 0 < i < len(line) - 1 and line[i - 1].isalnum() and line[i + 1].isalnum()
        out.append("\\" + char if char in _MARKDOWN_SPECIAL and char != "\\" and not intraword else char)
    return "".join(out)


def markdown_code(text) -> str:
    """TEXT as a Markdown inline code span, backticks included: one line (as
    :func:`python_comment`), delimited by one backtick more than the longest run of backticks in
    it, padded with a space where it starts or ends with a backtick or a space (CommonMark strips
    one space on each side)."""
    line = _one_line(str(text))
    if not line:
        return "` `"
    longest = max((len(run) for run in re.findall("`+", line)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if (line[0] in "` " or line[-1] in "` ") and line.strip(" ") else ""
    return f"{fence}{pad}{line}{pad}{fence}"


# The jinja filters of the codegen templates (fgc.codegen.package._jinja): every {{ }} that prints
# text goes through one of them
FILTERS = {
    "python_literal": python_literal,
    "python_identifier": python_identifier,
    "python_comment": python_comment,
    "python_docstring": python_docstring,
    "shell_word": shell_word,
    "shell_comment": shell_comment,
    "markdown_text": markdown_text,
    "markdown_code": markdown_code,
}
