"""The Jinja2 environment configs render in: sandboxed, strict, with fgc's globals and filters."""

from __future__ import annotations

import collections.abc
import datetime
import functools
import math
import os
import platform
import re
import socket
import string
import sys

import jinja2
import jinja2.compiler
import jinja2.meta
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import yaml


# Plain scalars that mean the same everywhere: no indicators, no flow characters, no edge spaces.
# "@" (reserved in YAML) may not start a plain scalar
_PLAIN_SAFE_RE = re.compile(r"[A-Za-z0-9_./+=$-](?:[A-Za-z0-9_./+=@$' -]*[A-Za-z0-9_./+=@$-])?")


class TemplateRaise(Exception):
    """``raise(msg)`` or a failed ``assert(cond, msg)`` in a template."""


class KnobRequired(TemplateRaise):
    """A knob the config cannot build without (``model_dir`` of a fine-tune): ``fgc ls`` lists
    such a config as fine, needing ``-D NAME=...``."""

    def __init__(self, message: str, name: str, metavar: str = "VALUE"):
        super().__init__(message)
        self.name, self.metavar = name, metavar


class TemplateLimit(TemplateRaise):
    """A template went past one of fgc's resource limits (reported at its line, like ``raise``)."""


# Resource limits of one render (docs/safety.md). Generous: a real config is a few kilobytes.
MAX_VALUE_CHARS = 10**7  # one string or list that an operator, a call or a filter makes
MAX_INT_BITS = 10**6  # one integer that ``*`` or ``**`` makes
MAX_OUTPUT_CHARS = 64 * 2**20  # the whole rendered text (64 MiB)
MAX_STEPS = 500_000  # loop iterations plus calls (5 times the longest range())

# Noncharacters around every value printed as data, so that the rendered YAML can be checked to
# hold each one as a scalar (fgc.frontend.render); never valid in a user's text, like the origin
# markers of fgc.frontend.preprocess (U+FDD0, U+FDD1).
DATA_OPEN = "\ufdd2"
DATA_CLOSE = "\ufdd3"
INTERNAL_MARKS = "\ufdd0\ufdd1" + DATA_OPEN + DATA_CLOSE  # origin and data marks
_DATA_MARKS = str.maketrans("", "", INTERNAL_MARKS)


class DataStr(str):
    """A string that is data, not config text: a ``-D`` value, an environment variable, a file or
    path name, a field of a config.json. Printed with ``{{ }}`` it goes through :func:`toyaml` (and
    is checked to stay one YAML scalar), so it can never become a tag, an anchor, an alias or
    structure. Strings that templates derive from it (slices, characters, ``~``, ``+``, ``%``,
    ``*``, filters, method and function calls) are DataStr too."""

    __slots__ = ()

    def __getitem__(self, key):
        return DataStr(str.__getitem__(self, key))

    def __iter__(self):
        return (DataStr(c) for c in str.__iter__(self))


class PathStr(DataStr):
    """A path made only from the locations of the config's own files (``project_dir``,
    ``workspace_root``, ``config_dir``), template text and the path functions (``joinpath``,
    ``dirname``, ...). Still data, but a path of plain characters prints as plain text, so that
    Forgather's ``!singleton:{{ joinpath(project_dir, 'model.py') }}:Model`` works: it can only
    name a file of the user's own tree, never bring text from a -D, the environment or a file."""

    __slots__ = ()

    def plain(self) -> bool:
        """Whether it prints as itself: YAML-plain path characters, read back as this string."""
        text = str.__str__(self)
        return bool(_PATH_PLAIN_RE.fullmatch(text)) and not text.startswith(("-", "...")) and _toyaml(self) == text


_PATH_PLAIN_RE = re.compile(r"[A-Za-z0-9_./-]+")
PATH_GLOBALS = ("project_dir", "workspace_root", "config_dir")


def _only_paths(parts) -> bool:
    """Whether every piece of data among PARTS is a PathStr (the rest is template text)."""
    return all(isinstance(p, PathStr) or not is_data(p) for p in parts)


def _as_path(result):
    """A path function's RESULT on paths, as PathStr (tuples of splitext too)."""
    if isinstance(result, str):
        return PathStr(result)
    if isinstance(result, tuple):
        return tuple(_as_path(r) for r in result)
    return as_data(result)


def _path_function(func):
    """FUNC as a path function: an undefined argument is an "undefined" error naming it (not a
    TypeError of os.path); on PathStr and template text, it gives PathStr."""

    @functools.wraps(func)
    def checked(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, jinja2.Undefined):
                arg._fail_with_undefined_error()
        return func(*args, **kwargs)

    checked._fgc_path = True
    return checked


class JoinedStr(DataStr):
    """Data joined with template text by ``~`` or ``+``: a DataStr that remembers its parts,
    ``(text, is_data)``. Printed, it is one data value like any DataStr, except after a literal
    ``#``: a comment the template writes (``== '# ' ~ key ~ ': ' ~ value``) stays a comment, its
    data pieces marked one by one (data in a comment is harmless)."""

    __slots__ = ("parts",)

    @staticmethod
    def join(items) -> "DataStr":
        parts: list[tuple[str, bool]] = []
        for item in items:
            if isinstance(item, JoinedStr):
                parts.extend(item.parts)
            else:
                parts.append((str.__str__(item), isinstance(item, DataStr)))
        out = JoinedStr("".join(text for text, _ in parts))
        out.parts = tuple(parts)
        return out

    def comment(self) -> bool:
        """Whether the template's own text starts it with ``#``."""
        first = next(((text, data) for text, data in self.parts if text), ("", True))
        return not first[1] and first[0].lstrip(" \t").startswith("#")


class YamlText(str):
    """YAML text that :func:`toyaml` (or ``tojson``) made: printed as it is, never re-quoted."""

    __slots__ = ()


class _DataIter:
    """An iterator whose items are data (e.g. a ``map`` filter over data)."""

    def __init__(self, inner):
        self._inner = iter(inner)

    def __iter__(self):
        return self

    def __next__(self):
        return as_data(next(self._inner))


def mark_data(value):
    """VALUE with every string in it (lists, tuples and mappings included) marked as data."""
    if isinstance(value, str):
        return value if isinstance(value, DataStr) else DataStr(value)
    if isinstance(value, list):
        return [mark_data(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(mark_data(v) for v in value)
    if isinstance(value, dict):
        return {mark_data(k): mark_data(v) for k, v in value.items()}
    return value


def is_data(value) -> bool:
    """Whether VALUE is data or holds data (iteratively: values may nest deeply)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, (DataStr, _DataIter)):
            return True
        if isinstance(v, (list, tuple, set, frozenset, dict)) and id(v) not in seen:
            seen.add(id(v))
            stack.extend(v.items() if isinstance(v, dict) else v)
    return False


def as_data(result):
    """RESULT, made from data, as data: a new string becomes a DataStr (inside lists, tuples and
    mappings too); an iterator yields data. Containers are copied only when something changes."""
    if isinstance(result, (DataStr, YamlText)):
        return result
    if isinstance(result, str):
        return DataStr(result)
    if isinstance(result, list):
        items = [as_data(v) for v in result]
        return result if all(a is b for a, b in zip(items, result)) else items
    if isinstance(result, tuple) and type(result) is tuple:
        items = tuple(as_data(v) for v in result)
        return result if all(a is b for a, b in zip(items, result)) else items
    if isinstance(result, dict) and type(result) is dict:
        items = {as_data(k): as_data(v) for k, v in result.items()}
        same = all(a is b for a, b in zip(items, result)) and all(
            items[k] is v for k, v in zip(items, result.values())
        )
        return result if same else items
    if isinstance(result, collections.abc.Iterator) and not isinstance(result, _DataIter):
        return _DataIter(result)
    return result


def printed_size(value, budget: int) -> int:
    """About how many characters VALUE takes printed (as text or YAML); counting stops past
    BUDGET. Every reference counts, so a list holding one long string many times is long."""
    total = 0
    stack = [value]
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 1
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            for k, item in v.items():
                stack.append(k)
                stack.append(item)
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += 24
    return total


def _too_large(what: str, size: int, limit: int = MAX_VALUE_CHARS, unit: str = "characters") -> TemplateLimit:
    return TemplateLimit(
        f"{what} would make a value of about {size} {unit}; "
        f"fgc's limit for one template value is {limit} {unit}"
    )


def _check_size(what: str, value) -> None:
    size = printed_size(value, MAX_VALUE_CHARS)
    if size > MAX_VALUE_CHARS:
        raise _too_large(what, size)


_PERCENT_SPEC_RE = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _ints_in(args) -> int:
    values = args.values() if isinstance(args, dict) else args if isinstance(args, (list, tuple)) else [args]
    return sum(abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool))


def _percent_bound(fmt: str, args) -> int:
    """An upper bound of the length of ``FMT % ARGS`` (widths and precisions included)."""
    bound = len(fmt) + printed_size(args, MAX_VALUE_CHARS)
    for m in _PERCENT_SPEC_RE.finditer(fmt):
        for part in m.groups():
            if part == "*":
                bound += _ints_in(args)
            elif part:
                bound += int(part)
    return bound


def _format_bound(fmt: str, args, kwargs) -> int:
    """An upper bound of the length of ``FMT.format(*ARGS, **KWARGS)``."""
    bound = len(fmt) + printed_size([args, kwargs], MAX_VALUE_CHARS)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return bound  # the real call reports it
    for _, _, spec, _ in fields:
        if spec:
            bound += sum(int(d) for d in re.findall(r"\d+", spec))
            if "{" in spec:  # a width given as an argument
                bound += _ints_in(args) + _ints_in(kwargs)
    return bound


def _check_binop(operator: str, left, right) -> None:
    """Refuse an operation whose result would pass a limit, before it is computed."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 1:
                size = printed_size(seq, MAX_VALUE_CHARS) * n
                if size > MAX_VALUE_CHARS:
                    raise _too_large(f"{_short(left)} * {_short(right)}", size)
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise _too_large(f"{_short(left)} * {_short(right)}", bits, MAX_INT_BITS, "bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 1 and abs(left) > 1:
            bits = right * math.log2(abs(left))
            if bits > MAX_INT_BITS:
                raise _too_large(f"{_short(left)} ** {_short(right)}", int(bits), MAX_INT_BITS, "bits")
    elif operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            size = printed_size([left, right], MAX_VALUE_CHARS)
            if size > MAX_VALUE_CHARS:
                raise _too_large("'+'", size)
    elif operator == "%" and isinstance(left, str):
        size = _percent_bound(left, right)
        if size > MAX_VALUE_CHARS:
            raise _too_large("'%'", size)


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "<a large integer>"
    return text if len(text) <= 40 else text[:37] + "..."


def _installed_version(name: str) -> str | None:
    """The version of the installed distribution NAME, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class Versions(dict):
    """``versions``: the versions of python and of the libraries Forgather lists (torch,
    transformers, accelerate), read from the installed packages' metadata (nothing is imported);
    a library that is not installed is absent."""

    LIBRARIES = ("torch", "transformers", "accelerate")

    def __init__(self) -> None:
        super().__init__(python=DataStr(platform.python_version()))
        for name in self.LIBRARIES:
            found = _installed_version(name)
            if found is not None:
                self[name] = DataStr(found)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _NotedStr(DataStr):
    """A string global whose use makes the build machine-specific (noted when it is printed)."""

    def __new__(cls, value: str, name: str | None = None, nonrepro: dict[str, str] | None = None):
        self = super().__new__(cls, value)
        self._name, self._nonrepro = name, nonrepro
        return self

    def __str__(self) -> str:
        if self._nonrepro is not None:
            self._nonrepro[self._name] = str.__str__(self)
        return str.__str__(self)


def host_globals(nonrepro: dict[str, str]) -> dict:
    """``hostname``, ``uname`` and ``versions`` for a config's render."""
    return {
        "hostname": _NotedStr(socket.gethostname(), "hostname", nonrepro),
        "uname": mark_data(platform.uname()._asdict()),
        "versions": Versions(),
    }


def toyaml(value, *default):
    """Render a value as a one-line YAML scalar or flow collection. Made from data, the text is
    marked so that the render can check it stays one YAML node where it is printed."""
    if isinstance(value, jinja2.Undefined):
        if default:
            value = default[0]
        else:
            value._fail_with_undefined_error()
    _check_size("toyaml", value)
    text = _toyaml(value)
    return YamlText(DATA_OPEN + text + DATA_CLOSE if is_data(value) else text)


def yaml_repr(value) -> str:
    """``repr(VALUE)`` for the template global: Python's repr, but for data a YAML scalar that is
    always quoted (what ``{{ repr(x) }}`` is used for), marked like :func:`toyaml`'s."""
    if not is_data(value):
        return repr(value)
    _check_size("repr", value)
    text = _toyaml(value)
    if isinstance(value, str) and not text.startswith(("'", '"')):
        text = "'" + text + "'"  # plain-safe text has no quote to double
    return YamlText(DATA_OPEN + text + DATA_CLOSE)


def _loads_as_str_in_yaml_1_1(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return False


def _toyaml(value, depth: int = 0) -> str:
    if depth > 100:
        raise TemplateLimit("a value nests deeper than 100 levels (fgc's limit)")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toyaml(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toyaml(k, depth + 1)}: {_toyaml(v, depth + 1)}" for k, v in value.items()) + "}"
    text = str(value)
    if isinstance(value, DataStr):
        # a data string that holds rendered template text (``{% set s %}...``) is one value
        text = text.translate(_DATA_MARKS)
    if (
        _PLAIN_SAFE_RE.fullmatch(text)  # fullmatch: "$" would accept a trailing newline
        and isinstance(_resolve_plain(text), str)  # fgc reads YAML 1.2 ...
        and _loads_as_str_in_yaml_1_1(text)  # ... other tools YAML 1.1 (yes, on, 1_000)
    ):
        return text  # safe as a plain scalar in block and flow context alike
    if text.isprintable():
        return "'" + text.replace("'", "''") + "'"
    # control characters, line breaks: a double-quoted scalar with escapes, on one line
    return yaml.safe_dump(text, default_style='"', width=1 << 30).strip().removesuffix("\n...")


def _resolve_plain(text: str):
    from .loader import resolve_plain_scalar  # the loader imports this module

    return resolve_plain_scalar(text)


class TrackedNamespace(jinja2.utils.Namespace):
    """``namespace()`` that records the template line of every ``-- set ns.NAME = ...``.

    ``history[NAME]`` lists (template key, line) in the order the assignments ran, so the origin
    of a knob (the child's line, not the parent's default) can be shown in generated code and by
    ``fgc explain``.
    """

    def __init__(*args, **kwargs):  # Namespace's own signature: (self, *args, **kwargs)
        self, history, *rest = args
        super(TrackedNamespace, self).__init__(*rest, **kwargs)
        object.__setattr__(self, "_fgc_history", history)
        object.__setattr__(self, "_fgc_usage", None)

    def __getattribute__(self, name):
        if name not in ("_Namespace__attrs", "__class__") and not name.startswith("_fgc_"):
            usage = object.__getattribute__(self, "_fgc_usage")
            if usage is not None:
                usage.read(name)
        return super().__getattribute__(name)

    def __setitem__(self, name, value):
        where = template_line()
        if where is not None:
            object.__getattribute__(self, "_fgc_history").setdefault(name, []).append(where)
        usage = object.__getattribute__(self, "_fgc_usage")
        if usage is not None:
            usage.wrote(name)
        super().__setitem__(name, value)


class KnobUsage:
    """When each ``ns.NAME`` was last set and last read, in the order the render ran: a knob
    whose last set is never read again reaches nothing (docs/language.md, "No silent knobs")."""

    def __init__(self) -> None:
        # for each name, one count per set (in the order of its NS_HISTORY entries): the reads
        # of the value that set gave, before the next set
        self.reads: dict[str, list[int]] = {}

    def read(self, name: str) -> None:
        """Note a read of ``ns.NAME``."""
        counts = self.reads.get(name)
        if counts:
            counts[-1] += 1

    def wrote(self, name: str) -> None:
        """Note a set of ``ns.NAME`` (after its right-hand side, which may read it, ran)."""
        self.reads.setdefault(name, []).append(0)

    def unread(self) -> list[str]:
        """The names whose last value no template line read."""
        return sorted(n for n, counts in self.reads.items() if counts and counts[-1] == 0)


class KnobNoEffect(TemplateRaise):
    """``no_effect(NAME, WHY)`` in a template: a knob set to a value another setting makes
    irrelevant. Reported at the set (the ``-D``, or the config line), not at the template line."""

    def __init__(self, message: str, where: tuple[str, int] | None, define: str | None):
        super().__init__(message)
        self.where = where  # (template key, line) of the last set of the knob
        self.define = define  # the -D NAME that gave the value, if one did


def template_line() -> tuple[str, int] | None:
    """(template key, line) of the innermost template frame running now: where a global or a
    namespace was called from."""
    frame = sys._getframe(1)
    while frame is not None:
        template = frame.f_globals.get("__jinja_template__")
        if template is not None:
            return template.filename, template.get_corresponding_lineno(frame.f_lineno)
        frame = frame.f_back
    return None


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja2's code generator, with fgc's hooks: ``~`` keeps data marked
    (``environment.fgc_concat``), literal template text is counted against the output limit and
    every loop's iterable is counted against the step limit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop_iters: set[int] = set()

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.fgc_concat(context.eval_ctx, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node, frame) -> None:
        self._loop_iters.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node, *args, **kwargs):
        if id(node) in self._loop_iters:
            self.write("environment.fgc_loop(")
            super().visit(node, *args, **kwargs)
            self.write(")")
            return None
        return super().visit(node, *args, **kwargs)

    def visit_Template(self, node, frame=None) -> None:
        # the names this template reads from its context, gathered while it compiles (what
        # jinja2.meta.find_undeclared_variables would find by generating its code again)
        self._reads = self.environment.fgc_reads.setdefault(id(node), (node, set()))[1]
        super().visit_Template(node, frame)

    def enter_frame(self, frame) -> None:
        super().enter_frame(frame)
        for _, (action, param) in frame.symbols.loads.items():
            if action == "resolve" and param not in self.environment.globals:
                self._reads.add(param)

    def visit_Output(self, node, frame) -> None:
        if frame.require_output_check and self.has_known_extends:
            return  # Jinja2 writes nothing here either
        size = sum(len(child.data) for child in node.nodes if isinstance(child, jinja2.nodes.TemplateData))
        if size:
            self.writeline(f"environment.fgc_count({size})", node)
        super().visit_Output(node, frame)


class FgcEnvironment(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox configs render in: data stays data (:class:`DataStr`) through every operation,
    and each value, the output and the work done are bounded (``MAX_*``), each refused at the
    template line that would pass the limit."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def __init__(self, **kwargs):
        # no constant folding: every operation then runs through the checks below
        super().__init__(optimized=False, finalize=_finalize, **kwargs)
        self.fgc_output = 0  # characters printed so far
        self.fgc_steps = 0  # loop iterations and calls so far
        self._trees: dict[str, jinja2.nodes.Template] = {}  # template source → its syntax tree
        # id of a compiled syntax tree → (the tree, the context names its code reads)
        self.fgc_reads: dict[int, tuple[jinja2.nodes.Template, set[str]]] = {}

    def join_path(self, template, parent):
        """Jinja calls this for every extends and include, with the referring template's name:
        the loader learns where a template reached by a computed name came from, so that an
        error inside it names the user's line that led there."""
        note = getattr(self.loader, "note_reference", None)
        if note is not None:
            note(template, parent)
        return super().join_path(template, parent)

    def _parse(self, source, name, filename):
        """Parse each template source once: the render compiles it, and the names it reads are
        then collected from the same tree (neither changes it: no constant folding here)."""
        tree = self._trees.get(source)
        if tree is None:
            tree = self._trees[source] = super()._parse(source, name, filename)
        return tree

    def context_names(self, source: str) -> set[str]:
        """The names the template SOURCE reads from its context (``jinja2.meta``'s undeclared
        variables): recorded when the render compiled it, else found now."""
        tree = self._trees.get(source)
        if tree is not None and id(tree) in self.fgc_reads:
            return set(self.fgc_reads[id(tree)][1])
        return jinja2.meta.find_undeclared_variables(self.parse(source))

    def fgc_count(self, size: int) -> None:
        """Count SIZE characters of output against MAX_OUTPUT_CHARS."""
        self.fgc_output += size
        if self.fgc_output > MAX_OUTPUT_CHARS:
            raise TemplateLimit(
                f"the rendered config is larger than {MAX_OUTPUT_CHARS // 2**20} MiB (fgc's limit)"
            )

    def fgc_step(self) -> None:
        """Count one loop iteration or call against MAX_STEPS."""
        self.fgc_steps += 1
        if self.fgc_steps > MAX_STEPS:
            raise TemplateLimit(
                f"the template ran more than {MAX_STEPS} loop iterations and calls (fgc's limit); "
                "does a loop or a macro run without end?"
            )

    def fgc_loop(self, iterable):
        """A loop's iterable, counted one step per item."""
        for item in iterable:
            self.fgc_step()
            yield item

    def fgc_concat(self, eval_ctx, parts):
        """``a ~ b ~ ...``: as Jinja2 does it, but bounded, and data when a part is data."""
        _check_size("'~'", list(parts))
        join = jinja2.runtime.markup_join if eval_ctx.autoescape else jinja2.runtime.str_join
        result = join(parts)
        if not any(is_data(p) for p in parts):
            return result
        if not eval_ctx.autoescape and _only_paths(parts) and all(isinstance(p, str) for p in parts):
            return PathStr(result)
        if not eval_ctx.autoescape and all(isinstance(p, str) for p in parts):
            return JoinedStr.join(parts)
        return DataStr(result)

    def call_binop(self, context, operator, left, right):
        """``*``, ``**``, ``%`` and ``+``: bounded; the result of data is data."""
        _check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if not (is_data(left) or is_data(right)):
            return result
        if operator == "+" and isinstance(left, str) and isinstance(right, str):
            if _only_paths((left, right)):
                return PathStr(result)
            return JoinedStr.join((left, right))
        return as_data(result)

    def call(self, context, obj, /, *args, **kwargs):
        """A call from a template: counted, bounded, and data when a part of it is data."""
        self.fgc_step()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(obj, "__name__", ""), args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        _check_result("a call", result)
        if isinstance(obj, (jinja2.runtime.Macro, jinja2.runtime.BlockReference, jinja2.runtime.LoopContext)):
            return result  # rendered template text: its data is already printed as data
        if isinstance(owner, (dict, list, tuple, set, frozenset)) and not is_data(owner):
            return result  # an element of the container (get, pop, ...): marked or not already
        if getattr(obj, "_fgc_path", False) and (is_data(args) or is_data(kwargs)):
            if _only_paths(args) and _only_paths(kwargs.values()):
                return _as_path(result)
        if is_data(owner) or is_data(args) or is_data(kwargs):
            return as_data(result)
        return result

    def wrap_str_format(self, value):
        """``str.format``/``format_map``, sandboxed by Jinja2, bounded by fgc; data stays data."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__
        is_map = value.__name__ == "format_map"

        def bounded(*args, **kwargs):
            size = _format_bound(fmt, args[0] if is_map and args else args, kwargs)
            if size > MAX_VALUE_CHARS:
                raise _too_large(f"{value.__name__}()", size)
            result = wrapper(*args, **kwargs)
            return as_data(result) if is_data(fmt) or is_data(args) or is_data(kwargs) else result

        return bounded


def _check_result(what: str, result) -> None:
    if isinstance(result, (str, list, tuple, dict)) and len(result) > MAX_VALUE_CHARS:
        raise _too_large(what, len(result))


_WIDTH_METHODS = {"ljust", "rjust", "center", "zfill"}


def _check_str_method(owner: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse a string method whose result would pass MAX_VALUE_CHARS; returns ARGS (an iterator
    given to ``join`` is read into a list first, to be measured)."""
    size = 0
    if name in _WIDTH_METHODS:
        width = args[0] if args else kwargs.get("width", 0)
        size = max(len(owner), width if isinstance(width, int) else 0)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        size = len(owner) * max(tabsize if isinstance(tabsize, int) else 8, 1)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = len(owner) + 1 if not args[0] else owner.count(args[0])
        size = len(owner) + count * len(args[1])
    elif name == "join" and args:
        items = list(args[0]) if not isinstance(args[0], (str, list, tuple, dict)) else args[0]
        args = (items, *args[1:])
        size = printed_size(items, MAX_VALUE_CHARS) + len(owner) * len(items)
    if size > MAX_VALUE_CHARS:
        raise _too_large(f"str.{name}()", size)
    return args


def _lipsum(n=5, html=True, min=20, max=100):
    """Jinja2's ``lipsum`` with its sizes bounded (its text is fixed, so it is not data)."""
    if n * max > 10**5:
        raise TemplateLimit(f"lipsum(n={n}, max={max}) would make more than 100000 words (fgc's limit)")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


@jinja2.pass_eval_context  # evaluated at run time only: no constant folding of what is printed
def _finalize(eval_ctx, value):
    """How ``{{ value }}`` prints: data through :func:`toyaml`, marked; lists, tuples and
    mappings through toyaml (Python's repr is not YAML); ``None`` as ``null`` and non-finite
    floats as ``.nan``/``.inf`` (their Python spellings load as strings); the rest as Jinja2
    prints it. Every printed character counts against MAX_OUTPUT_CHARS."""
    env = eval_ctx.environment
    budget = MAX_OUTPUT_CHARS - env.fgc_output
    if value is None:
        text = "null"
    elif isinstance(value, float) and not math.isfinite(value):
        text = _toyaml(value)
    elif isinstance(value, (DataStr, list, tuple, dict)) and not isinstance(value, YamlText):
        size = printed_size(value, budget)
        if size > budget:
            raise TemplateLimit(
                f"the rendered config would be larger than {MAX_OUTPUT_CHARS // 2**20} MiB (fgc's limit)"
            )
        if isinstance(value, PathStr) and value.plain():
            text = str.__str__(value)
        elif isinstance(value, JoinedStr) and value.comment():
            text = "".join(
                DATA_OPEN + _toyaml(DataStr(part)) + DATA_CLOSE if data else part for part, data in value.parts
            )
        else:
            text = _toyaml(value)
            if is_data(value):
                text = DATA_OPEN + text + DATA_CLOSE
    else:
        if not isinstance(value, jinja2.Undefined):
            env.fgc_count(len(value) if isinstance(value, str) else len(str(value)))
        return value
    env.fgc_count(len(text))
    return text


def _strip_marked(text: str, chars: str | None) -> str:
    """``text.strip(chars)`` for rendered text that holds origin markers (fgc.frontend.preprocess):
    markers among the stripped characters go too, except the last one before the first kept
    character, which names that character's line."""
    from .preprocess import _MARK_RE, MARK_CLOSE, MARK_OPEN

    def strippable(c: str) -> bool:
        return c in chars if chars is not None else c.isspace()

    i, origin = 0, ""
    while i < len(text):
        m = _MARK_RE.match(text, i)
        if m:
            origin, i = m.group(0), m.end()
        elif strippable(text[i]):
            i += 1
        else:
            break
    j = len(text)
    while j > i:
        if text[j - 1] == MARK_CLOSE and text.rfind(MARK_OPEN, i, j) >= 0:
            j = text.rfind(MARK_OPEN, i, j)
        elif strippable(text[j - 1]):
            j -= 1
        else:
            break
    return (origin if i < j else "") + text[i:j]


def _trim(value, chars=None):
    """Jinja2's ``trim`` filter, aware of origin markers: ``-- filter trim()`` around a block
    trims the block's text, not the invisible marks before its first line."""
    out = _strip_marked(jinja2.filters.soft_str(value), chars)
    return mark_data(out) if is_data(value) else out


def _trim_newlines(value) -> str:
    """What ``=> EXPR`` prints: the expression's text without newlines at either end."""
    return _trim(value, "\n")


# platformdirs' functions that Forgather's templates call, by the same names and arguments
PLATFORM_DIRS = ("user_data_dir", "user_cache_dir", "user_config_dir", "site_data_dir", "site_config_dir")


def _forgather_config_dir() -> str:
    from .project import forgather_config_dir

    return forgather_config_dir()


def _platform_dir(name: str, note):
    """The template global NAME: platformdirs' function of that name, its result noted."""

    def call(*args, **kwargs):
        import platformdirs

        _check_size(name, (args, kwargs))
        # a build reads where the folder is; it never creates it (ensure_exists)
        value = getattr(platformdirs, name)(*args, **{**kwargs, "ensure_exists": False})
        return note(f"{name}()", value)

    return call


def make_environment(
    loader: jinja2.BaseLoader,
    nonrepro: dict[str, str],
    ns_history: dict | None = None,
    notes: list | None = None,
    knob_usage: KnobUsage | None = None,
    defines=(),
) -> jinja2.Environment:
    """A sandboxed, strict Jinja2 environment; non-reproducible globals note their values in NONREPRO;
    namespace assignments are recorded in NS_HISTORY, and their sets and reads in KNOB_USAGE; NOTES
    gets ``(message, (template key, line))`` for what the user should know but is no error
    (config.json fields ``hf_config()`` ignores). DEFINES: the ``-D`` names, for ``no_effect``."""
    env = FgcEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )

    def note(name, value):
        nonrepro[name] = str(value)
        return mark_data(value)  # from the machine, not from the config: data

    def _raise(msg):
        raise TemplateRaise(str(msg))

    def _assert(cond, msg="assertion failed"):
        if not cond:
            raise TemplateRaise(str(msg))
        return ""

    def hf_config(model_dir=None):
        from fgc.hf import read_config_json  # fgc.hf imports this module

        ignored: list[str] = []
        config = read_config_json(model_dir, nonrepro, ignored)
        if notes is not None:
            notes.extend((message, template_line()) for message in ignored)
        return mark_data(config)

    def abspath(p):
        # an absolute path is its own abspath: only a relative one depends on the directory
        return os.path.abspath(p) if os.path.isabs(p) else note(f"abspath({p})", os.path.abspath(p))

    env.globals.update(
        joinpath=_path_function(lambda *parts: os.path.join(*parts)),
        normpath=_path_function(lambda p: os.path.normpath(p)),
        abspath=_path_function(abspath),
        relpath=_path_function(
            lambda p, start=None: (
                os.path.relpath(p, start) if start is not None else note(f"relpath({p})", os.path.relpath(p))
            )
        ),
        dirname=_path_function(lambda p: os.path.dirname(p)),
        basename=_path_function(lambda p: os.path.basename(p)),
        splitext=_path_function(lambda p: os.path.splitext(p)),
        getenv=lambda name, default=None: note(f"getenv({name})", os.environ.get(name, default)),
        getcwd=lambda: note("getcwd()", os.getcwd()),
        user_home_dir=lambda: note("user_home_dir()", os.path.expanduser("~")),
        # Forgather's: a module's name from its file path, and the user's and the site's folders
        # (platformdirs'; machine-specific, so noted like the home directory)
        modname_from_path=_path_function(lambda path: os.path.splitext(os.path.basename(path))[0]),
        forgather_config_dir=lambda: note("forgather_config_dir()", _forgather_config_dir()),
        **{name: _platform_dir(name, note) for name in PLATFORM_DIRS},
        repr=yaml_repr,
        lipsum=_lipsum,
        now=lambda: note("now()", datetime.datetime.now()),
        utcnow=lambda: note("utcnow()", datetime.datetime.now(datetime.timezone.utc)),
        # to the second, as Forgather prints them
        isotime=lambda: note("isotime()", datetime.datetime.now().isoformat(timespec="seconds")),
        utcisotime=lambda: note(
            "utcisotime()",
            datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds"),
        ),
        filetime=lambda: note("filetime()", datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")),
        utcfiletime=lambda: note(
            "utcfiletime()",
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S"),
        ),
    )
    history = ns_history if ns_history is not None else {}
    usage = knob_usage if knob_usage is not None else KnobUsage()
    defines = set(defines or ())

    def namespace(*args, **kwargs):
        ns = TrackedNamespace(history, *args, **kwargs)
        object.__setattr__(ns, "_fgc_usage", usage)
        return ns

    def no_effect(name, why):
        """Refuse knob NAME, set to a value that WHY (``with trainer_type ddp: ...``) ignores."""
        sets = history.get(str(name), [])
        define = str(name) if str(name) in defines else None
        raise KnobNoEffect(f"{name} has no effect {why}", sets[-1] if sets else None, define)

    env.globals["namespace"] = namespace
    env.globals["no_effect"] = no_effect
    env.globals["raise"] = _raise
    env.globals["assert"] = _assert
    env.globals["hf_config"] = hf_config
    if hasattr(loader, "record_parent"):
        env.globals["fgc_parent"] = loader.record_parent
    env.filters["toyaml"] = toyaml
    env.filters["fgc_trim_newlines"] = _trim_newlines
    env.filters["trim"] = _trim
    for name, func in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, func)
    return env


# Filters whose output is YAML text already (printed as it is), and filters whose output size is
# bounded by a width or a count given to them (checked before they run).
_YAML_FILTERS = {"toyaml", "tojson"}


def _filter_bound(name: str, args: tuple, kwargs: dict) -> int:
    """An upper bound of the size of a filter's result, for the filters that can grow their input
    past its size; 0 for the others."""
    value = args[0] if args else None
    rest = args[1:]

    def arg(i, key, default):
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    if name == "center":
        width = arg(0, "width", 80)
        return max(len(str(value)), width if isinstance(width, int) else 0)
    if name == "indent":
        width = arg(0, "width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        text = str(value)
        return len(text) + (text.count("\n") + 1) * max(pad, 0)
    if name == "wordwrap":
        text = str(value)
        return len(text) * (1 + len(str(arg(3, "wrapstring", "\n") or "\n")))
    if name == "replace" and len(rest) >= 2:
        text, old, new = str(value), str(rest[0]), str(rest[1])
        count = len(text) + 1 if not old else text.count(old)
        return len(text) + count * len(new)
    if name == "format" and isinstance(value, str):
        return _percent_bound(value, kwargs or rest)
    if name == "join":
        items = value if isinstance(value, (list, tuple, str, dict)) else None
        if items is None:
            return 0  # an iterator: measured after (see _bounded_filter)
        return printed_size(items, MAX_VALUE_CHARS) + len(str(arg(0, "d", ""))) * len(items)
    if name in ("string", "pprint", "tojson", "toyaml", "list", "urlencode", "xmlattr", "e", "escape",
                "forceescape"):
        grows = name in ("e", "escape", "forceescape", "urlencode", "tojson")  # escapes: up to 6 characters each
        return printed_size(value, MAX_VALUE_CHARS) * (6 if grows else 1)
    return 0


def _bounded_filter(name: str, func):
    """FUNC with fgc's bounds and data marking: a result made from data is data."""
    pass_arg = jinja2.utils._PassArg.from_obj(func)

    def bounded(*args, **kwargs):
        values = args[1:] if pass_arg is not None else args
        if name == "join" and values and not isinstance(values[0], (list, tuple, str, dict)):
            values = (list(values[0]), *values[1:])  # an iterator: read it to measure it
            args = (*args[:1], *values) if pass_arg is not None else values
        size = _filter_bound(name, values, kwargs)
        if size > MAX_VALUE_CHARS:
            raise _too_large(f"the {name} filter", size)
        result = func(*args, **kwargs)
        _check_result(f"the {name} filter", result)
        if name in _YAML_FILTERS:
            if isinstance(result, YamlText):
                return result
            data = is_data(values) or is_data(kwargs)
            return YamlText(DATA_OPEN + str(result) + DATA_CLOSE if data else str(result))
        if is_data(values) or is_data(kwargs):
            return as_data(result)
        return result

    if pass_arg is not None:
        bounded.jinja_pass_arg = pass_arg
    return functools.update_wrapper(bounded, func)


