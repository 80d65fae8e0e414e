"""Rendering: a config file → YAML text, through sandboxed strict Jinja2 over a search path.

Every template is preprocessed (:mod:`fgc.frontend.preprocess`) as it loads
(:mod:`fgc.frontend.templates`); origin markers map each line of the output back to the template
line it came from, and every error Jinja2 raises is mapped back to the file and line the user wrote.
"""

from __future__ import annotations

import bisect
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.compiler
import jinja2.parser
import yaml

from ..errors import Diagnostic, FgcError, Location, display_path
from .environment import (  # noqa: F401
    DATA_CLOSE,
    DATA_OPEN,
    KnobNoEffect,
    KnobRequired,
    KnobUsage,
    PathStr,
    TemplateRaise,
    host_globals,
    make_environment,
    mark_data,
    toyaml,
)
from .preprocess import strip_markers
from .project import ConfigSource, resolve_config
from .templates import LIBRARY_DIR, FgcLoader, TemplateFile, library_name  # noqa: F401

_NS_REF_RE = re.compile(r"\{\{[^}]*?\bns\.(\w+)")
_VERBS = {"extends": "extends", "include": "includes", "import": "imports", "from": "imports from"}


@dataclass
class Rendered:
    """The output of rendering: YAML text plus the origin of every line."""

    text: str
    origins: list[tuple[int, int] | None]
    loader: FgcLoader
    root: TemplateFile
    source: ConfigSource | None = None
    warnings: list[Diagnostic] = field(default_factory=list)
    nonreproducible: dict[str, str] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)  # every variable name a template reads
    ns_history: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # ns.NAME -> sets
    variables: dict = field(default_factory=dict)  # -D NAME=VALUE

    def origins_of(self, loc: Location) -> list[tuple[Location, str | None]]:
        """Where a value written at LOC really came from, oldest first: for a line that prints one
        ``ns.NAME``, every ``-- set ns.NAME`` that ran (with the ``-D NAME=VALUE`` it read, if
        any), then LOC itself."""
        tf = next(
            (f for f in self.files.values() if str(f.path) == loc.file and loc.line is not None
             and f.line_offset < loc.line <= f.line_offset + f.text.count("\n") + 1),
            None,
        )
        out: list[tuple[Location, str | None]] = []
        if tf is not None:
            text = tf.text.split("\n")[loc.line - tf.line_offset - 1]
            names = set(_NS_REF_RE.findall(text))
            if len(names) == 1:
                name = names.pop()
                for key, line in self.ns_history.get(name, []):
                    setter_tf = self.loader.by_key.get(key)
                    setter = setter_tf.text.split("\n")[line - 1] if setter_tf else ""
                    read = [
                        f"-D {var}={self.variables[var]!r}"
                        for var in sorted(self.variables)
                        if re.search(rf"(?<![\w.]){re.escape(var)}(?!\w)", setter.split("=", 1)[-1])
                    ]
                    out.append((self.loader.location(key, line), ", ".join(read) or None))
        out.append((loc, None))
        return out

    @property
    def files(self) -> dict[int, TemplateFile]:
        return self.loader.files

    def location(self, rendered_line: int, col: int | None = None) -> Location:
        """The template location of a 0-based line of the rendered text."""
        origin = self.origins[rendered_line] if 0 <= rendered_line < len(self.origins) else None
        if origin is None:
            return Location(str(self.root.path))
        return self.file_location(origin[0], origin[1], col)

    def file_location(self, file_id: int, line: int, col: int | None = None) -> Location:
        return self.loader.location(self.files[file_id].key, line, col)

    def chain_of_templates(self) -> list[str]:
        """The display names of every template loaded, in load order."""
        return [f.display for f in sorted(self.files.values(), key=lambda f: f.file_id)]


_STATEMENT_RE = re.compile(r"\{%-?\s*(\w+)([^%]*)")
_OPENERS = {"if", "for", "block", "macro", "call", "filter", "with", "raw"}


def _unclosed_statement(source: str) -> tuple[str, int] | None:
    """The innermost block statement (``if``, ``for``, ``block``, ...) that is never closed."""
    stack: list[tuple[str, int]] = []
    for lineno, line in enumerate(source.split("\n"), start=1):
        for m in _STATEMENT_RE.finditer(line):
            word, rest = m.group(1), m.group(2)
            if word in _OPENERS or (word == "set" and "=" not in rest):
                stack.append((word, lineno))
            elif word.startswith("end") and stack:
                stack.pop()
    return stack[-1] if stack else None


def _template_frame(exc: BaseException, loader: FgcLoader) -> tuple[str, int] | None:
    """The innermost traceback frame that is a template line: (template key, line)."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in loader.by_key:
            found = (frame.filename, frame.lineno)
    return found


def _error_location(exc: BaseException, loader: FgcLoader, root: TemplateFile) -> Location:
    frame = _template_frame(exc, loader)
    return loader.location(*frame) if frame else Location(str(root.path))


def block_warnings(loader: FgcLoader) -> list[Diagnostic]:
    """A warning for each top-level block of a child template that no parent defines."""
    warnings = []
    for tf in sorted(loader.files.values(), key=lambda f: f.file_id):
        parent = loader.parent_of(tf)
        if parent is None:
            continue
        inherited: set[str] = set()
        seen: set[str] = set()
        while parent is not None and parent.key not in seen:
            seen.add(parent.key)
            inherited.update(name for name, _, _ in parent.blocks)
            parent = loader.parent_of(parent)
        for name, line, depth in tf.blocks:
            if depth == 0 and name not in inherited:
                warnings.append(
                    Diagnostic(
                        f"block {name!r} is not defined by the template this one extends; "
                        "its content is ignored",
                        loader.location(tf.key, line),
                        hint="check the block name for a typo",
                        severity="warning",
                    )
                )
    return warnings


_DATA_MARK_RE = re.compile(f"[{DATA_OPEN}{DATA_CLOSE}]")
_FLOW_TOKENS = (
    yaml.FlowSequenceStartToken, yaml.FlowSequenceEndToken, yaml.FlowMappingStartToken,
    yaml.FlowMappingEndToken, yaml.FlowEntryToken, yaml.KeyToken, yaml.ValueToken, yaml.ScalarToken,
)
_Scanner = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DATA_HINT = (
    "data (a -D value, an environment variable, a file's content) is printed as one YAML value: "
    "write it alone after the key ({{ x }}), or build the whole string first ({{ x ~ '/suffix' }})"
)


def strip_data_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the marks around printed data. Returns the clean text and the (start, end) offsets in
    it of every outermost marked span."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    depth, start, pos, last = 0, 0, 0, 0
    for m in _DATA_MARK_RE.finditer(text):
        chunk = text[last : m.start()]
        out.append(chunk)
        pos += len(chunk)
        last = m.end()
        if m.group() == DATA_OPEN:
            if depth == 0:
                start = pos
            depth += 1
        elif depth:  # a close without an open (text cut by a filter) is dropped
            depth -= 1
            if depth == 0 and pos > start:
                spans.append((start, pos))
    out.append(text[last:])
    return "".join(out), spans


def _scan(text: str) -> tuple[list, int | None]:
    """The YAML tokens of TEXT (up to a scanning error) and the offset of that error, if any."""
    tokens = []
    try:
        for token in yaml.scan(text, Loader=_Scanner):
            tokens.append(token)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return tokens, mark.index if mark is not None else len(text)
    except yaml.YAMLError:
        return tokens, len(text)
    return tokens, None


def _tokens_by_span(tokens, spans):
    """For each span, the tokens that overlap it (a token of no width: strictly inside it)."""
    starts = [a for a, _ in spans]
    found: list[list] = [[] for _ in spans]
    for token in tokens:
        s, e = token.start_mark.index, token.end_mark.index
        i = bisect.bisect_right(starts, s if s == e else e - 1) - 1  # the last span starting at or before
        while i >= 0 and spans[i][1] > s:
            a, b = spans[i]
            if (s < e and s < b and e > a) or (s == e and a < s < b):
                found[i].append(token)
            i -= 1
    return found


def _span_ok(span, tokens) -> bool:
    """Whether printed data at SPAN is one YAML value: inside one scalar, a whole flow collection of
    scalars, or in a comment."""
    a, b = span
    if not tokens:
        return True
    if len(tokens) == 1 and isinstance(tokens[0], yaml.ScalarToken):
        start, end = tokens[0].start_mark.index, tokens[0].end_mark.index
        if start == a and tokens[0].style:  # its own quoted scalar: it must close where it ends
            return end == b
        return start <= a and end >= b
    first, last = tokens[0], tokens[-1]
    return (
        isinstance(first, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken))
        and first.start_mark.index == a
        and last.end_mark.index == b
        and all(isinstance(t, _FLOW_TOKENS) for t in tokens)
        and all(a <= t.start_mark.index and t.end_mark.index <= b for t in tokens)
    )


def _quoted_for(style: str, value: str) -> str | None:
    """VALUE written inside an author's quoted or block scalar of STYLE, exactly; None if it
    cannot be (a line break inside '...' or a block scalar)."""
    if style == '"':
        text = yaml.safe_dump(value, default_style='"', width=1 << 30).strip().removesuffix("\n...")
        return text[1:-1]
    if not value.isprintable():
        return None
    return value.replace("'", "''") if style == "'" else value


def _decode_scalar(text: str) -> str | None:
    """The string a toyaml scalar stands for (plain, '...' or "..."); None if TEXT is not one."""
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    if text.startswith('"'):
        try:
            value = yaml.load(text, Loader=_Scanner)
        except yaml.YAMLError:
            return None
        return value if isinstance(value, str) else None
    if text and not text.startswith(("[", "{")):
        return text
    return None


def _rendering(piece: str, tokens, span) -> tuple[str | None, str | None]:
    """How the data PIECE (toyaml text) is written where a neutral placeholder at SPAN has
    TOKENS around it: (text, None), or (None, the reason it cannot be)."""
    a, b = span
    if any(isinstance(t, (yaml.TagToken, yaml.AnchorToken, yaml.AliasToken, yaml.DirectiveToken)) for t in tokens):
        return None, "data cannot be part of a YAML tag, anchor, alias or directive"
    if len(tokens) != 1 or not isinstance(tokens[0], yaml.ScalarToken):
        return piece, None  # a value of its own (or in a comment)
    token = tokens[0]
    if token.start_mark.index == a and token.end_mark.index == b:
        return piece, None  # the whole scalar
    if token.style:  # inside an author's quoted or block scalar: that scalar's own escaping
        value = _decode_scalar(piece)
        value = piece if value is None else value
        text = _quoted_for(token.style, value)
        if text is None:
            return None, (
                f"data printed inside {token.style} text holds a line break or a control character, "
                'which that text cannot hold; print it inside "..." quotes, or alone after the key'
            )
        return text, None
    if piece.startswith(("'", '"', "[", "{")):
        return None, (
            f"data printed here is not plain text ({piece[:40]}) and cannot be part of the plain "
            "text around it"
        )
    return piece, None


def check_data(marked: str, rendered_location) -> str:
    """The rendered text without data marks, each printed piece of data written so that it is
    one YAML value: alone, a value as toyaml wrote it; inside an author's quoted or block scalar
    (``name: "run-{{ x }}"``), that scalar's own escaping, so it keeps its exact value. Where it
    stands is found in the text with a neutral letter in its place; the result is checked again.
    Data that cannot be written so is an error at its line."""
    text, spans = strip_data_marks(marked)
    if not spans:
        return text
    neutral_parts, neutral_spans, last, pos = [], [], 0, 0
    for a, b in spans:
        neutral_parts += [text[last:a], "x"]
        pos += a - last
        neutral_spans.append((pos, pos + 1))
        pos, last = pos + 1, b
    neutral_parts.append(text[last:])
    tokens, _ = _scan("".join(neutral_parts))
    parts, final_spans, last, pos = [], [], 0, 0
    for (a, b), nspan, around in zip(spans, neutral_spans, _tokens_by_span(tokens, neutral_spans)):
        rendering, problem = _rendering(text[a:b], around, nspan)
        if rendering is None:
            hint = None if "quotes" in problem else _DATA_HINT
            raise FgcError(problem, rendered_location(text.count("\n", 0, a)), hint=hint)
        parts += [text[last:a], rendering]
        pos += a - last
        final_spans.append((pos, pos + len(rendering)))
        pos, last = pos + len(rendering), b
    parts.append(text[last:])
    final = "".join(parts)
    tokens, error_at = _scan(final)
    for span, around in zip(final_spans, _tokens_by_span(tokens, final_spans)):
        a, b = span
        if error_at is not None and a > error_at:
            break  # not scanned: the text is not YAML there, which loading reports
        if (error_at is not None and a <= error_at <= b) or not _span_ok(span, around):
            raise FgcError(
                "data printed here does not stay one YAML value in the text around it",
                rendered_location(final.count("\n", 0, a)),
                hint=_DATA_HINT,
            )
    return final


def render_file(
    path: Path,
    search_path: list[Path],
    context: dict,
    source: ConfigSource | None = None,
    variables: dict | None = None,
) -> Rendered:
    """Render the template file PATH with CONTEXT over SEARCH_PATH; errors point into the user's files."""
    path = Path(path).resolve()
    loader = FgcLoader(search_path)
    nonrepro: dict[str, str] = {}
    ns_history: dict[str, list[tuple[str, int]]] = {}
    notes: list[tuple[str, tuple[str, int] | None]] = []
    usage = KnobUsage()
    env = make_environment(loader, nonrepro, ns_history, notes, usage, variables or ())
    root = loader.load_file(path.name, path)
    # -D values, paths and every other value from outside the templates are data (see DataStr)
    context = {**host_globals(nonrepro), **{name: mark_data(value) for name, value in context.items()}}
    try:
        text = "".join(env.get_template(root.key).generate(context))
    except FgcError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        key = exc.filename if exc.filename in loader.by_key else root.key
        hint = None
        opened = _unclosed_statement(loader.by_key[key].source) if key in loader.by_key else None
        if opened and "Unexpected end of template" in str(exc.message):
            where = loader.location(key, opened[1])
            hint = f"the '{opened[0]}' opened at {display_path(where.file)}:{where.line} is never closed"
        raise FgcError(f"template syntax: {exc.message}", loader.location(key, exc.lineno), hint) from None
    except jinja2.TemplateNotFound as exc:
        from ..families import FAMILIES

        hint = "searched: " + ", ".join(str(p) for p in loader.search_path)
        if re.fullmatch(r"lm/[^/]+\.yaml", str(exc.name)):
            hint = "the model families are " + ", ".join(FAMILIES) + f" (lm/NAME.yaml); {hint}"
        raise FgcError(f"template not found: {exc.name!r}", _error_location(exc, loader, root), hint=hint) from None
    except RecursionError as exc:
        cycle = loader.find_cycle(root)
        if not cycle:
            raise _too_deep(exc, loader, root) from None
        steps = ", ".join(
            f"{display_path(str(tf.path))}:{tf.file_line(ref.line)} "
            f"{_VERBS.get(ref.kind, ref.kind)} {ref.name!r}"
            for tf, ref in cycle
        )
        first, ref = cycle[0]
        raise FgcError(f"extends/include cycle: {steps}", loader.location(first.key, ref.line)) from None
    except (SyntaxError, MemoryError) as exc:  # Python's own limits compiling a template's code
        if isinstance(exc, SyntaxError) and exc.filename not in loader.by_key:
            raise
        key = exc.filename if isinstance(exc, SyntaxError) else loader.last_key
        raise FgcError(
            f"the template nests too deeply for Python to compile ({getattr(exc, 'msg', exc) or 'out of memory'})",
            loader.location(key or root.key, None),
        ) from None
    except KnobNoEffect as exc:
        if exc.define is not None:
            raise FgcError(f"-D {exc.define}: {_plain_message(str(exc))}", Location("<command line>")) from None
        where = loader.location(*exc.where) if exc.where else _error_location(exc, loader, root)
        raise FgcError(_plain_message(str(exc)), where) from None
    except (TemplateRaise, jinja2.TemplateError, jinja2.exceptions.SecurityError) as exc:
        message = str(exc) if isinstance(exc, TemplateRaise) else f"template: {exc}"
        if isinstance(exc, jinja2.UndefinedError):
            message = f"undefined: {exc.message}"
        error = FgcError(_plain_message(message), _error_location(exc, loader, root))
        if isinstance(exc, KnobRequired):
            error.required_knob = f"{exc.name}={exc.metavar}"  # fgc ls: the config needs it, not a mistake
        raise error from None
    except Exception as exc:  # e.g. a TypeError of an expression: the template's mistake
        frame = _template_frame(exc, loader)
        if frame is None:
            raise
        message = f"template: {type(exc).__name__}: {exc}"
        raise FgcError(_plain_message(message), loader.location(*frame)) from None
    text, origins = strip_markers(text)
    rendered = Rendered(
        text, origins, loader, root, source, nonreproducible=nonrepro, ns_history=ns_history,
        variables=dict(variables or {}),
    )
    rendered.text = check_data(text, rendered.location)
    project = source.project if source is not None else None
    unread_knobs(
        loader, ns_history, usage, variables or {}, rendered.warnings,
        project_dir=project.dir if project is not None else None,
    )
    for tf in loader.files.values():
        rendered.referenced |= env.context_names(tf.source)
    rendered.warnings.extend(block_warnings(loader))
    for message, where in notes:
        loc = loader.location(*where) if where is not None else Location(str(path))
        rendered.warnings.append(Diagnostic(message, loc, severity="note"))
    for key in sorted(nonrepro):
        rendered.warnings.append(
            Diagnostic(
                f"the build is not reproducible: the config uses {key} = {nonrepro[key]!r}",
                Location(str(path)),
                severity="warning",
            )
        )
    return rendered


def _block_at(tf: TemplateFile, line: int) -> tuple[str, int] | None:
    """The top-level block of TF that holds its line LINE: (name, line of its start)."""
    found = None
    for name, start, depth in tf.blocks:
        if depth == 0 and start <= line:
            found = (name, start)
    return found


def _replaced_reader(loader: FgcLoader, name: str) -> tuple[str, Location, Location] | None:
    """Why no line that ran read ``ns.NAME``: a template's line reads it inside a block that a
    template loaded before it (a child) replaces. (block, the replacing block's location, the
    reading line's location), or None when no such block is found."""
    read_re = re.compile(rf"\bns\.{re.escape(name)}\b(?!\s*=[^=])")
    files = sorted(loader.files.values(), key=lambda f: f.file_id)  # a child loads before its parent
    for tf in files:
        for i, text in enumerate(tf.text.split("\n"), start=1):
            if not read_re.search(text):
                continue
            block = _block_at(tf, i)
            if block is None:
                continue
            winner = next(
                (f for f in files for b, start, depth in f.blocks if depth == 0 and b == block[0]), None
            )
            if winner is not None and winner is not tf:
                start = next(s for b, s, d in winner.blocks if d == 0 and b == block[0])
                return block[0], loader.location(winner.key, start), loader.location(tf.key, i)
    return None


def _reads_define(loader: FgcLoader, key: str, line: int, name: str) -> bool:
    """Whether the ``-- set ns.NAME = ...`` at template KEY's LINE reads the variable NAME."""
    tf = loader.by_key.get(key)
    setter = tf.text.split("\n")[line - 1] if tf is not None else ""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", setter.split("=", 1)[-1]) is not None


def unread_knobs(
    loader: FgcLoader,
    ns_history: dict[str, list[tuple[str, int]]],
    usage: KnobUsage,
    variables: dict,
    warnings: list[Diagnostic],
    project_dir: Path | None = None,
) -> None:
    """A knob whose last value no template line read never reaches the program: an error for a
    ``-D`` that gave that value, a warning (naming the set and the block that dropped it) for a
    set in a config of the user's. Knobs that libraries set are their own business: fgc's, and in
    a project (PROJECT_DIR) every template outside it (a workspace's or Forgather's library)."""

    def library(tf: TemplateFile | None) -> bool:
        if tf is None or library_name(tf.path) is not None:
            return True
        return project_dir is not None and project_dir not in Path(tf.path).resolve().parents

    errors = []
    for name in sorted(set(variables) & set(usage.reads)):
        # a -D read by a set whose value a later set replaces before any line reads it
        sets, counts = ns_history.get(name, []), usage.reads[name]
        if len(sets) != len(counts):
            continue
        reading = [i for i, (key, line) in enumerate(sets) if _reads_define(loader, key, line, name)]
        if reading and reading[-1] < len(sets) - 1 and counts[reading[-1]] == 0:
            later = loader.location(*sets[reading[-1] + 1])
            errors.append(
                Diagnostic(
                    f"-D {name}: {name} has no effect: {later} sets ns.{name} again before any line reads it",
                    Location("<command line>"),
                )
            )
    for name in sorted(usage.reads):
        # an override (not a name's first set, its default) that a later set replaces before any
        # line reads it: the value of the config's line never reaches the program
        sets, counts = ns_history.get(name, []), usage.reads[name]
        if len(sets) != len(counts):
            continue
        for i in range(1, len(sets) - 1):
            key, line = sets[i]
            if counts[i] or sets[i + 1] == sets[i] or library(loader.by_key.get(key)):
                continue
            if name in variables and _reads_define(loader, key, line, name):
                continue  # the -D error above
            later = loader.location(*sets[i + 1])
            warnings.append(
                Diagnostic(
                    f"ns.{name} set here has no effect: {display_path(later.file)}:{later.line} sets it "
                    "again before any line reads it",
                    loader.location(key, line),
                    severity="warning",
                )
            )
    for name in usage.unread():
        sets = ns_history.get(name)
        if not sets:
            continue
        key, line = sets[-1]
        from_define = name in variables and _reads_define(loader, key, line, name)
        if not from_define and library(loader.by_key.get(key)):
            continue
        replaced = _replaced_reader(loader, name)
        why = (
            f"the [{replaced[0]}] block at {replaced[1]} replaces the one that reads it ({replaced[2]})"
            if replaced
            else "no template line that runs reads it"
        )
        if from_define:
            errors.append(Diagnostic(f"-D {name}: {name} has no effect: {why}", Location("<command line>")))
        else:
            warnings.append(
                Diagnostic(
                    f"ns.{name} set here has no effect: {why}", loader.location(key, line), severity="warning"
                )
            )
    if errors:
        raise FgcError(diagnostics=errors)


def _plain_message(message: str) -> str:
    """A template error's message as the user sees it: no data marks, data strings called str."""
    return _DATA_MARK_RE.sub("", message).replace("'DataStr'", "'str'").replace("'_NotedStr'", "'str'")


def _too_deep(exc: RecursionError, loader: FgcLoader, root: TemplateFile) -> FgcError:
    """A RecursionError that is no extends/include cycle: a macro that calls itself without end
    (at the line of its template frame), or a template nested too deeply for Jinja2 to parse or
    compile (at the line Jinja2's parser or code generator was at)."""
    frame = _template_frame(exc, loader)
    if frame is not None:
        return FgcError(
            "the template recurses too deeply (a macro that calls itself without end?)",
            loader.location(*frame),
        )
    key, line = loader.last_key or root.key, None
    tb = exc.__traceback__
    while tb is not None:  # the innermost parser or code generator frame knows the line
        local = tb.tb_frame.f_locals
        owner = local.get("self")
        if isinstance(owner, jinja2.parser.Parser):
            line = owner.stream.current.lineno
            key = owner.filename or key
        elif isinstance(owner, jinja2.compiler.CodeGenerator):
            node = local.get("node")
            line = getattr(node, "lineno", line)
            key = owner.filename or key
        tb = tb.tb_next
    return FgcError(
        "the template nests too deeply for Jinja2 (expressions or statements inside one another)",
        loader.location(key, line),
    )


def search_path_for(config: Path, include_dirs=(), project_dir=None) -> list[Path]:
    """The template search path of a config file."""
    return resolve_config(config, include_dirs, project_dir).search_path


def render(
    config: str | Path | None,
    include_dirs: list[str] | tuple[str, ...] = (),
    variables: dict | None = None,
    project_dir: str | Path | None = None,
) -> Rendered:
    """Preprocess and render CONFIG to YAML text, mapping every error to the user's file:line."""
    source = resolve_config(config, include_dirs, project_dir)
    # the config's own locations are paths (PathStr); a -D of the same name is data like any -D
    context = {"config_dir": PathStr(source.path.parent), **source.globals(), **(variables or {})}
    return render_file(source.path, source.search_path, context, source, variables)
