"""Template files: finding them on the search path, inline templates, and what each one references.

A file may hold inline templates: a line ``#--- name ---`` ends the file's own template and starts
one registered under ``name`` (usable by ``extends``/``include`` once the file is loaded). Every
template is preprocessed as it loads; its lines are reported as lines of the file that holds it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from ..errors import FgcError, Location
from .preprocess import Reference, preprocess

LIBRARY_DIR = Path(__file__).resolve().parent.parent / "templates"


def library_name(path: str | Path) -> str | None:
    """The name a template of fgc's library is extended by (``lm/train.yaml``; a family's
    template, which lives in its folder, ``lm/NAME.yaml``), or None for any other file."""
    from ..families import family_of_template

    path = Path(path)
    try:
        return path.resolve().relative_to(LIBRARY_DIR).as_posix()
    except ValueError:
        family = family_of_template(path)
        return family.library_name if family is not None else None


def _family_template(name: str) -> Path | None:
    """The template of the family NAME (``lm/NAME.yaml``) names, if it is a registered family."""
    from ..families import FAMILIES

    family = next((f for f in FAMILIES.values() if f.library_name == name), None)
    return family.template.resolve() if family is not None else None

_INLINE_RE = re.compile(r"^#[ \t]*-{3,}[ \t]*([\w./]+)[ \t]*-{3,}[ \t]*$")


@dataclass
class TemplateFile:
    """One template the render loaded: a file, or an inline template inside one."""

    file_id: int
    name: str  # the name it was loaded by
    path: Path  # the file that holds it (absolute)
    text: str
    line_offset: int = 0  # lines of the file above the template's first line
    inline_name: str | None = None
    origin: tuple[str, int] | None = None  # (key of the template referring to it, its line)
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (name, line, depth)
    references: list[Reference] = field(default_factory=list)  # literal extends/includes
    computed_extends: int | None = None  # the line of an extends whose name is computed
    source: str = ""  # preprocessed Jinja2 source

    @property
    def key(self) -> str:
        """The template's identity (Jinja2's filename for it)."""
        return f"{self.path}#{self.inline_name}" if self.inline_name else str(self.path)

    def file_line(self, line: int | None) -> int | None:
        """A line of this template as a line of its file."""
        return None if line is None else line + self.line_offset

    @property
    def display(self) -> str:
        """A stable name for manifests: library templates as ``<fgc>/NAME``."""
        name = library_name(self.path)
        text = f"<fgc>/{name}" if name is not None else str(self.path)
        return f"{text}#{self.inline_name}" if self.inline_name else text


# Python compiles at most 20 loops inside one another (and Jinja2's parser recurses on nesting):
# statements nested deeper are refused at the line that crosses the limit.
MAX_STATEMENT_DEPTH = 20
_STATEMENT_RE = re.compile(r"\{%[-+]?\s*(\w+)([^%]*)")
_OPENERS = {"if", "for", "block", "macro", "call", "filter", "with", "autoescape", "trans"}


def too_deep_statements(source: str) -> int | None:
    """The first line of a preprocessed template whose statements (if, for, block, ...) nest
    deeper than MAX_STATEMENT_DEPTH; None if none does."""
    depth = 0
    raw = False
    for lineno, line in enumerate(source.split("\n"), start=1):
        for m in _STATEMENT_RE.finditer(line):
            word, rest = m.group(1), m.group(2)
            if raw:
                raw = word != "endraw"
            elif word == "raw":
                raw = True
            elif word in _OPENERS or (word == "set" and "=" not in rest):
                depth += 1
                if depth > MAX_STATEMENT_DEPTH:
                    return lineno
            elif word.startswith("end") and depth:
                depth -= 1
    return None


def split_inline(text: str) -> list[tuple[str | None, int, str]]:
    """(inline name or None, line offset, text) for the file's own template and each inline one."""
    lines = text.split("\n")
    sections: list[tuple[str | None, int, list[str]]] = [(None, 0, [])]
    for i, line in enumerate(lines):
        m = _INLINE_RE.match(line)
        if m:
            sections.append((m.group(1), i + 1, []))
        else:
            sections[-1][2].append(line)
    return [(name, offset, "\n".join(body)) for name, offset, body in sections]


class FgcLoader(jinja2.BaseLoader):
    """Finds templates (inline ones first, then the search path) and preprocesses them."""

    def __init__(self, search_path: list[Path]):
        self.search_path = search_path
        self.files: dict[int, TemplateFile] = {}
        self.computed_parents: dict[int, str] = {}  # file id -> the name its computed extends gave
        self.by_key: dict[str, TemplateFile] = {}
        self.inline: dict[str, TemplateFile] = {}
        self.origins: dict[str, tuple[str, int]] = {}  # template name -> (referrer key, line)
        self._chains: dict[str, tuple[tuple[str, int], ...]] = {}  # cleared when an origin is learnt
        self.last_key: str | None = None  # the template Jinja2 asked for last (compiling it, maybe)

    def find(self, name: str) -> Path | None:
        """Resolve a template name on the search path (absolute paths are taken as they are)."""
        if os.path.isabs(name):
            return Path(name) if os.path.isfile(name) else None
        for base in self.search_path:
            candidate = (base / name).resolve()
            if candidate.is_file():
                return candidate
            if base.resolve() == LIBRARY_DIR:  # the families' templates are the library's too
                family = _family_template(name)
                if family is not None:
                    return family
        return None

    def lookup(self, name: str) -> TemplateFile | None:
        """The template NAME refers to, loading its file if needed."""
        if name in self.inline:
            return self.inline[name]
        path = self.find(name)
        return None if path is None else self.load_file(name, path)

    def _add(self, tf: TemplateFile) -> TemplateFile:
        pre = preprocess(tf.text, tf.file_id)
        deep = too_deep_statements(pre.source)
        if deep is not None:
            raise FgcError(
                f"statements nest deeper than {MAX_STATEMENT_DEPTH} levels here (fgc's limit)",
                Location(str(tf.path), tf.file_line(deep)),
            )
        tf.blocks, tf.references, tf.source = pre.blocks, pre.references, pre.source
        tf.computed_extends = pre.computed_extends
        for ref in pre.references:
            self.origins.setdefault(ref.name, (tf.key, tf.file_line(ref.line)))
        self.files[tf.file_id] = tf
        self.by_key[tf.key] = tf
        return tf

    def load_file(self, name: str, path: Path) -> TemplateFile:
        """Load a file's own template, registering its inline templates."""
        if str(path) in self.by_key:
            return self.by_key[str(path)]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise FgcError(f"file is not valid UTF-8 (byte {exc.start})", Location(str(path), line)) from None
        except OSError as exc:
            raise FgcError(f"cannot read file: {exc.strerror}", Location(str(path))) from None
        sections = split_inline(text)
        _, _, own_text = sections[0]
        own = self._add(
            TemplateFile(len(self.files), name, path, own_text, origin=self.origins.get(name))
        )
        for inline_name, offset, body in sections[1:]:
            if inline_name in self.inline:
                first = self.inline[inline_name]
                raise FgcError(
                    f"inline template {inline_name!r} is defined twice "
                    f"(first at {Location(str(first.path), first.line_offset)})",
                    Location(str(path), offset),
                )
            tf = TemplateFile(
                len(self.files), inline_name, path, body, line_offset=offset,
                inline_name=inline_name, origin=self.origins.get(inline_name),
            )
            self.inline[inline_name] = self._add(tf)
        return own

    def get_source(self, environment, template):
        tf = self.lookup(template)
        if tf is None:
            raise jinja2.TemplateNotFound(template)
        if tf.origin is None and template in self.origins:
            tf.origin = self.origins[template]
            self._chains.clear()
        self.last_key = tf.key
        return tf.source, tf.key, lambda: True

    def note_reference(self, name: str, parent: str) -> None:
        """PARENT extends or includes NAME at render time. Literal references are known from the
        preprocessor; a computed one (``-- extends "lm/" ~ family ~ ".yaml"``) is learnt here,
        from the line of PARENT's computed extends, so errors in NAME trace back to it."""
        if name in self.origins:
            return
        referrer = self.lookup(parent)
        if referrer is None or referrer.computed_extends is None:
            return
        self.origins[name] = (referrer.key, referrer.file_line(referrer.computed_extends))

    def location(self, key: str, line: int | None, col: int | None = None) -> Location:
        """A template line as a Location in the user's file, with the chain it came through."""
        tf = self.by_key.get(key)
        if tf is None:
            return Location(key, line, col)
        return Location(str(tf.path), tf.file_line(line), col, chain=self.chain(tf))

    def chain(self, tf: TemplateFile) -> tuple[tuple[str, int], ...]:
        """(file, line) of each extends/include that led to TF, innermost first."""
        cached = self._chains.get(tf.key)
        if cached is not None:
            return cached
        self._chains[tf.key] = result = self._chain(tf)
        return result

    def _chain(self, tf: TemplateFile) -> tuple[tuple[str, int], ...]:
        chain: list[tuple[str, int]] = []
        seen: set[str] = set()
        while tf.origin is not None and tf.key not in seen:
            seen.add(tf.key)
            parent = self.by_key.get(tf.origin[0])
            if parent is None:
                break
            chain.append((str(parent.path), tf.origin[1]))
            tf = parent
        return tuple(chain)

    def find_cycle(self, root: TemplateFile) -> list[tuple[TemplateFile, Reference]]:
        """A cycle of literal extends/includes reachable from ROOT, as (template, reference) steps."""
        stack: list[tuple[TemplateFile, Reference]] = []
        on_stack: dict[str, int] = {}
        done: set[str] = set()

        def visit(tf: TemplateFile) -> list[tuple[TemplateFile, Reference]]:
            on_stack[tf.key] = len(stack)
            for ref in tf.references:
                child = self.inline.get(ref.name)
                if child is None:
                    path = self.find(ref.name)
                    child = self.by_key.get(str(path)) if path is not None else None
                if child is None:
                    continue
                stack.append((tf, ref))
                if child.key in on_stack:
                    return stack[on_stack[child.key] :]
                if child.key not in done:
                    found = visit(child)
                    if found:
                        return found
                stack.pop()
            del on_stack[tf.key]
            done.add(tf.key)
            return []

        return visit(root)

    def parent_of(self, tf: TemplateFile) -> TemplateFile | None:
        """The template TF extends (by a literal name, or the one its computed name gave in the
        render: ``fgc_parent``), if it was loaded."""
        for ref in tf.references:
            if ref.kind == "extends":
                return self.inline.get(ref.name) or self.by_key.get(str(self.find(ref.name)))
        name = self.computed_parents.get(tf.file_id)
        if name is not None:
            return self.inline.get(name) or self.by_key.get(str(self.find(name)))
        return None

    def references_of(self, tf: TemplateFile) -> list[Reference]:
        """TF's literal references, and its computed extends with the name the render gave it."""
        refs = list(tf.references)
        name = self.computed_parents.get(tf.file_id)
        if name is not None and tf.computed_extends is not None:
            refs.insert(0, Reference("extends", name, tf.computed_extends))
        return refs

    def record_parent(self, name, file_id: int):
        """``fgc_parent(NAME, FILE_ID)``: note that template FILE_ID extends NAME; gives NAME."""
        if isinstance(name, str):
            self.computed_parents[file_id] = str(name)
        return name
