"""Preprocessing: Forgather line statements and ``[block]`` headers → Jinja2 source.

The output has exactly as many lines as the input, so a Jinja2 error's line number is the line the
user wrote. Each content line is prefixed with an invisible *origin marker* naming its template and
line; the markers survive rendering (through ``extends``, ``include`` and ``super()``) and are
stripped afterwards into a line map, which is how every YAML node learns its file and line.

The scanner knows where Jinja2 tags and YAML quoted scalars are, so ``##`` inside a quoted scalar or
inside an expression is text, and a line that continues a multi-line ``{{ … }}`` is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Noncharacters: never valid in a user's text, so they cannot collide with content.
MARK_OPEN = "\ufdd0"
MARK_CLOSE = "\ufdd1"
_MARK_RE = re.compile(f"{MARK_OPEN}(\\d+):(\\d+){MARK_CLOSE}")

_STATEMENT_RE = re.compile(r"^([ \t]*)(--|<<|>>|==|=>)[ \t](.*?)[ \t]*$")
_HEADER_RE = re.compile(r"^([ \t]*)\[(\w+)(!?)\][ \t]*$")
_COMMENT_LINE_RE = re.compile(r"^[ \t]*##.*$")  # as Forgather: ``##`` first on a line, any text after
_REFERENCE_RE = re.compile(r"^\s*(extends|include|import|from)\s+(['\"])(.+?)\2")
_EXTENDS_RE = re.compile(r"^\s*extends\s+(.+)$")
_LITERAL_RE = re.compile(r"'[^'\\]*'|\"[^\"\\]*\"")


@dataclass
class Reference:
    """A literal ``extends``/``include`` of another template, at a line of this one."""

    kind: str
    name: str
    line: int


@dataclass
class Preprocessed:
    source: str
    references: list[Reference] = field(default_factory=list)
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (name, line, depth)
    computed_extends: int | None = None  # the line of an extends whose name is computed


def marker(file_id: int, line: int) -> str:
    return f"{MARK_OPEN}{file_id}:{line}{MARK_CLOSE}"


def _indent_width(ws: str) -> int:
    return len(ws.expandtabs(8))


class _Scanner:
    """Tracks Jinja2 tag state across lines: whether a line starts inside ``{{``/``{%``/``{#``."""

    def __init__(self) -> None:
        self.close: str | None = None  # the closing delimiter we are inside, if any
        self.quote: str | None = None  # a Python string quote inside a tag
        self.raw = False

    @property
    def in_tag(self) -> bool:
        return self.close is not None or self.raw

    def feed(self, line: str) -> None:
        i, n = 0, len(line)
        while i < n:
            if self.raw:
                m = re.compile(r"\{%-?\s*endraw\s*-?%\}").search(line, i)
                if not m:
                    return
                self.raw, i = False, m.end()
                continue
            if self.close is None:
                j = line.find("{", i)
                if j < 0 or j + 1 >= n:
                    return
                nxt = line[j + 1]
                if nxt in "{%#":
                    m = re.compile(r"\{%-?\s*raw\s*-?%\}").match(line, j)
                    if m:
                        self.raw, i = True, m.end()
                        continue
                    self.close = {"{": "}}", "%": "%}", "#": "#}"}[nxt]
                    i = j + 2
                else:
                    i = j + 1
                continue
            if self.quote:
                k = line.find(self.quote, i)
                while k > 0 and line[k - 1] == "\\":
                    k = line.find(self.quote, k + 1)
                if k < 0:
                    return
                self.quote, i = None, k + 1
                continue
            c = line[i]
            if self.close != "#}" and c in "'\"":
                self.quote, i = c, i + 1
            elif line.startswith(self.close, i) or line.startswith("-" + self.close, i):
                i += len(self.close) + (line[i] == "-")
                self.close = None
            else:
                i += 1


def strip_trailing_comment(line: str, expression: bool = False) -> str:
    """Cut ``##`` comments preceded by whitespace, except inside YAML quoted scalars or Jinja2 tags.

    With ``expression`` (the body of a line statement, which is Jinja2 code) every quote opens a
    string literal, as in Python: ``-- set x = y ~ " ##"`` keeps its ``##``.
    """
    if "##" not in line:
        return line
    i, n = 0, len(line)
    last_sig = ""  # last significant (non-blank) character outside quotes
    token_first = ""  # first character of the current whitespace-separated token
    while i < n:
        c = line[i]
        previous_token_first = token_first
        if not c.isspace() and (i == 0 or line[i - 1] in " \t"):
            token_first = c
        if line.startswith(("{{", "{%", "{#"), i):
            close = {"{{": "}}", "{%": "%}", "{#": "#}"}[line[i : i + 2]]
            j = line.find(close, i + 2)
            if j < 0:
                return line
            i, last_sig = j + 2, "}"
            continue
        # a quote opens a quoted scalar after an indicator, or as the token after a tag or anchor
        after_property = token_first == c and previous_token_first in ("!", "&")
        if c in "'\"" and (expression or after_property or last_sig in ("", ":", "-", "[", "{", ",", "?")):
            j = i + 1
            while j < n:
                if expression and line[j] == "\\":
                    j += 2
                    continue
                if c == "'" and line[j] == "'":
                    if j + 1 < n and line[j + 1] == "'":
                        j += 2
                        continue
                    break
                if c == '"' and line[j] == "\\":
                    j += 2
                    continue
                if c == '"' and line[j] == '"':
                    break
                j += 1
            i, last_sig = j + 1, c
            continue
        if c == "#" and line.startswith("##", i) and i > 0 and line[i - 1] in " \t":
            return line[:i].rstrip()
        if not c.isspace():
            last_sig = c
        i += 1
    return line


_BLOCK_STMT_RE = re.compile(r"^block\s+(\w+)")
_ENDBLOCK_STMT_RE = re.compile(r"^endblock\b")


def preprocess(text: str, file_id: int) -> Preprocessed:
    """Rewrite one template's text into Jinja2 source with the same number of lines.

    ``[name]`` headers open implicit blocks that end at the next header of the same or a smaller
    indent, at the ``-- endblock`` of an explicit ``-- block`` they sit in, or at the end of the
    text. ``blocks`` records every block (implicit or explicit) with its line and nesting depth.
    """
    out: list[str] = []
    result = Preprocessed(source="")
    scanner = _Scanner()
    # open blocks, innermost last: (indent, name) for [headers], (None, name) for -- block
    open_blocks: list[tuple[int | None, str]] = []
    lines = text.split("\n")

    def close_implicit(min_indent: int) -> str:
        closing = ""
        while open_blocks and open_blocks[-1][0] is not None and open_blocks[-1][0] >= min_indent:
            open_blocks.pop()
            closing += "{% endblock %}"
        return closing

    for lineno, line in enumerate(lines, start=1):
        if scanner.in_tag:
            out.append(line)
            scanner.feed(line)
            continue
        header = _HEADER_RE.match(line)
        if header:
            indent = _indent_width(header.group(1))
            closing = close_implicit(indent)
            name, trim = header.group(2), header.group(3) == "!"
            result.blocks.append((name, lineno, len(open_blocks)))
            open_blocks.append((indent, name))
            opening = f"{{%- block {name} -%}}" if trim else f"{{% block {name} %}}"
            out.append(closing + opening)
            continue
        if _COMMENT_LINE_RE.match(line):
            out.append("{# #}")
            continue
        stmt = _STATEMENT_RE.match(line)
        if stmt:
            ws, kind, body = stmt.groups()
            body = strip_trailing_comment(body, expression=True)
            if kind in ("--", "<<", ">>"):
                ref = _REFERENCE_RE.match(body)
                computed = _EXTENDS_RE.match(body)
                if computed and not _LITERAL_RE.fullmatch(computed.group(1).strip()):
                    # a computed parent (extends "lm/" ~ family ~ ".yaml"): the render records
                    # which template it names, so that block checks follow the real parent
                    body = f"extends fgc_parent(({computed.group(1)}), {file_id})"
                    ref = None
                    result.computed_extends = lineno
                if ref:
                    result.references.append(Reference(ref.group(1), ref.group(3), lineno))
                closing = ""
                if _BLOCK_STMT_RE.match(body):
                    name = _BLOCK_STMT_RE.match(body).group(1)
                    result.blocks.append((name, lineno, len(open_blocks)))
                    open_blocks.append((None, name))
                elif _ENDBLOCK_STMT_RE.match(body):
                    closing = close_implicit(0)  # [headers] inside the explicit block end here
                    if open_blocks:
                        open_blocks.pop()
                left = "{%-" if kind == "<<" else "{%"
                right = "-%}" if kind == ">>" else "%}"
                new = f"{closing}{left} {body} {right}"
            # As Forgather's rewrite, the blanks before ``==``/``=>`` are dropped: the expression's
            # text comes with its own indentation (``== super()`` indented under a YAML key works)
            elif kind == "==":
                new = f"{marker(file_id, lineno)}{{{{ {body} }}}}"
            else:  # "=>": the expression's newlines at both ends are trimmed (Forgather's trim('\n'))
                new = f"{marker(file_id, lineno)}{{{{ ({body}) | string | fgc_trim_newlines }}}}"
            out.append(new)
            scanner.feed(new)
            continue
        content = strip_trailing_comment(line)
        out.append(marker(file_id, lineno) + content if content.strip() else content)
        scanner.feed(content)
    source = "\n".join(out)
    closing = close_implicit(0)
    if closing and out and out[-1].startswith(MARK_OPEN) and not scanner.in_tag:
        # a last line without its newline still ends its block's text with one (as Forgather)
        closing = "{{ '\\n' }}" + closing
    source += closing
    result.source = source
    return result


def strip_markers(rendered: str) -> tuple[str, list[tuple[int, int] | None]]:
    """Remove origin markers. Returns the clean text and, per output line, its (file_id, line).

    A line's origin is the last marker before its first character of content; a line without a
    marker continues the previous line's template (e.g. the rest of a multi-line expression).
    """
    clean_lines: list[str] = []
    origins: list[tuple[int, int] | None] = []
    previous: tuple[int, int] | None = None
    for line in rendered.split("\n"):
        origin = None
        pos = 0
        for m in _MARK_RE.finditer(line):
            if line[pos : m.start()].strip():
                break
            origin, pos = (int(m.group(1)), int(m.group(2))), m.end()
        if origin is None:
            m = _MARK_RE.search(line)
            if m:
                origin = (int(m.group(1)), int(m.group(2)))
            elif previous is not None:
                origin = (previous[0], previous[1] + 1)
        clean_lines.append(_MARK_RE.sub("", line))
        origins.append(origin)
        previous = origin
    return "\n".join(clean_lines), origins
