"""Rendering: a config file → YAML text, through sandboxed strict Jinja2 over a search path.

Search path, first match wins: the config's own directory, each ``-I`` directory in order, then
fgc's built-in template library (``fgc/templates``). Every template is preprocessed
(:mod:`fgc.frontend.preprocess`) as it is loaded, and every error Jinja2 raises is mapped back to the
file and line the user wrote.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
import yaml

from ..errors import Diagnostic, FgcError, Location, display_path
from .preprocess import Reference, preprocess, strip_markers

LIBRARY_DIR = Path(__file__).resolve().parent.parent / "templates"


class TemplateRaise(Exception):
    """``raise(msg)`` or a failed ``assert(cond, msg)`` in a template."""


@dataclass
class TemplateFile:
    """One template file the render loaded."""

    file_id: int
    name: str  # the name it was loaded by
    path: Path  # absolute
    text: str
    origin: tuple[str, int] | None = None  # (file, line) that first extended/included it
    blocks: list[tuple[str, int]] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)  # literal extends/includes

    @property
    def display(self) -> str:
        """A stable name for manifests: library templates as ``<fgc>/NAME``."""
        try:
            return "<fgc>/" + self.path.relative_to(LIBRARY_DIR).as_posix()
        except ValueError:
            return str(self.path)


@dataclass
class Rendered:
    """The output of rendering: YAML text plus the origin of every line."""

    text: str
    origins: list[tuple[int, int] | None]
    files: dict[int, TemplateFile]
    root: TemplateFile
    warnings: list[Diagnostic] = field(default_factory=list)
    nonreproducible: dict[str, str] = field(default_factory=dict)

    def location(self, rendered_line: int, col: int | None = None) -> Location:
        """The template location of a 0-based line of the rendered text."""
        origin = self.origins[rendered_line] if 0 <= rendered_line < len(self.origins) else None
        if origin is None:
            return Location(str(self.root.path))
        return self.file_location(origin[0], origin[1], col)

    def file_location(self, file_id: int, line: int, col: int | None = None) -> Location:
        tf = self.files[file_id]
        return Location(str(tf.path), line, col, chain=self.chain(tf))

    def chain(self, tf: TemplateFile) -> tuple[tuple[str, int], ...]:
        chain = []
        seen = set()
        while tf.origin is not None and tf.file_id not in seen:
            seen.add(tf.file_id)
            chain.append(tf.origin)
            parent = next((f for f in self.files.values() if str(f.path) == tf.origin[0]), None)
            if parent is None:
                break
            tf = parent
        return tuple(chain)

    def chain_of_templates(self) -> list[str]:
        """The display names of every template loaded, in load order."""
        return [f.display for f in sorted(self.files.values(), key=lambda f: f.file_id)]


class FgcLoader(jinja2.BaseLoader):
    """Finds templates on the search path and preprocesses them as they load."""

    def __init__(self, search_path: list[Path]):
        self.search_path = search_path
        self.files: dict[int, TemplateFile] = {}
        self.by_path: dict[str, TemplateFile] = {}
        self.origins: dict[str, tuple[str, int]] = {}  # template name -> (file, line) referring to it

    def find(self, name: str) -> Path | None:
        """Resolve a template name on the search path (absolute paths are taken as they are)."""
        if os.path.isabs(name):
            return Path(name) if os.path.isfile(name) else None
        for base in self.search_path:
            candidate = (base / name).resolve()
            if candidate.is_file():
                return candidate
        return None

    def load_file(self, name: str, path: Path) -> TemplateFile:
        key = str(path)
        if key in self.by_path:
            return self.by_path[key]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise FgcError(
                f"file is not valid UTF-8 (byte {exc.start})", Location(key)
            ) from None
        except OSError as exc:
            raise FgcError(f"cannot read file: {exc.strerror}", Location(key)) from None
        tf = TemplateFile(len(self.files), name, path, text, origin=self.origins.get(name))
        pre = preprocess(text, tf.file_id)
        tf.blocks = pre.blocks
        tf.references = pre.references
        tf.source = pre.source  # type: ignore[attr-defined]
        for ref in pre.references:
            self.origins.setdefault(ref.name, (key, ref.line))
        self.files[tf.file_id] = tf
        self.by_path[key] = tf
        return tf

    def get_source(self, environment, template):
        path = self.find(template)
        if path is None:
            raise jinja2.TemplateNotFound(template)
        tf = self.load_file(template, path)
        return tf.source, str(path), lambda: True  # type: ignore[attr-defined]


def toyaml(value, *default):
    """Render a value as a one-line YAML scalar or flow collection."""
    if isinstance(value, jinja2.Undefined):
        if default:
            value = default[0]
        else:
            value._fail_with_undefined_error()
    return _toyaml(value)


def _toyaml(value) -> str:
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
        return "[" + ", ".join(_toyaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toyaml(k)}: {_toyaml(v)}" for k, v in value.items()) + "}"
    text = str(value)
    dumped = yaml.safe_dump(text, default_flow_style=True, width=1 << 30).strip()
    dumped = dumped.removesuffix("\n...").strip()
    if "\n" in dumped:  # a multi-line string: one double-quoted line with escapes instead
        return yaml.safe_dump(text, default_style='"', width=1 << 30).strip()
    if not dumped.startswith(("'", '"')) and not isinstance(_resolve_plain(dumped), str):
        # PyYAML quotes by YAML 1.1 rules; fgc loads YAML 1.2 (``1e-4``, ``0o17`` are numbers)
        return "'" + dumped.replace("'", "''") + "'"
    return dumped


def _resolve_plain(text: str):
    from .loader import resolve_plain_scalar  # the loader imports this module

    return resolve_plain_scalar(text)


def _make_environment(loader: FgcLoader, nonrepro: dict[str, str]) -> jinja2.Environment:
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )

    def note(name, value):
        nonrepro[name] = str(value)
        return value

    def _raise(msg):
        raise TemplateRaise(str(msg))

    def _assert(cond, msg="assertion failed"):
        if not cond:
            raise TemplateRaise(str(msg))
        return ""

    env.globals.update(
        joinpath=lambda *parts: os.path.join(*parts),
        normpath=os.path.normpath,
        abspath=os.path.abspath,
        relpath=os.path.relpath,
        dirname=os.path.dirname,
        basename=os.path.basename,
        splitext=os.path.splitext,
        getenv=lambda name, default=None: note(f"getenv({name})", os.environ.get(name, default)),
        getcwd=lambda: note("getcwd()", os.getcwd()),
        user_home_dir=lambda: note("user_home_dir()", os.path.expanduser("~")),
        repr=repr,
        now=lambda: note("now()", datetime.datetime.now()),
        utcnow=lambda: note("utcnow()", datetime.datetime.now(datetime.timezone.utc)),
        isotime=lambda: note("isotime()", datetime.datetime.now().isoformat()),
        utcisotime=lambda: note(
            "utcisotime()", datetime.datetime.now(datetime.timezone.utc).isoformat()
        ),
        filetime=lambda: note("filetime()", datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")),
        utcfiletime=lambda: note(
            "utcfiletime()",
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S"),
        ),
    )
    env.globals["raise"] = _raise
    env.globals["assert"] = _assert
    env.filters["toyaml"] = toyaml
    env.filters["fgc_rstrip_newlines"] = lambda s: str(s).rstrip("\n")
    return env


def _template_frame(exc: BaseException, loader: FgcLoader) -> tuple[str, int] | None:
    """The innermost traceback frame that is a template line."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in loader.by_path:
            found = (frame.filename, frame.lineno)
    return found


def _location(loader: FgcLoader, file: str, line: int | None) -> Location:
    tf = loader.by_path.get(file)
    rendered = Rendered("", [], loader.files, tf) if tf else None
    return Location(file, line, chain=rendered.chain(tf) if rendered else ())


_VERBS = {"extends": "extends", "include": "includes", "import": "imports", "from": "imports from"}


def _find_cycle(loader: FgcLoader, root: TemplateFile) -> list[tuple[TemplateFile, Reference]]:
    """A cycle of literal extends/includes reachable from ROOT, as (template, reference) steps."""
    stack: list[tuple[TemplateFile, Reference]] = []
    on_stack: dict[str, int] = {}  # template path -> its position in stack
    done: set[str] = set()

    def visit(tf: TemplateFile) -> list[tuple[TemplateFile, Reference]]:
        key = str(tf.path)
        on_stack[key] = len(stack)
        for ref in tf.references:
            path = loader.find(ref.name)
            child = loader.by_path.get(str(path)) if path is not None else None
            if child is None:
                continue
            stack.append((tf, ref))
            if str(child.path) in on_stack:
                return stack[on_stack[str(child.path)] :]
            if str(child.path) not in done:
                found = visit(child)
                if found:
                    return found
            stack.pop()
        del on_stack[key]
        done.add(key)
        return []

    return visit(root)


def search_path_for(config: Path, include_dirs: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The template search path of a config file."""
    return [config.resolve().parent, *(Path(d).resolve() for d in include_dirs), LIBRARY_DIR]


def render(
    config: str | Path,
    include_dirs: list[str] | tuple[str, ...] = (),
    variables: dict | None = None,
) -> Rendered:
    """Preprocess and render CONFIG to YAML text, mapping every error to the user's file:line."""
    config_path = Path(config)
    if not config_path.is_file():
        what = "the config is a directory" if config_path.is_dir() else "no such config file"
        raise FgcError(what, Location(str(config_path)))
    config_path = config_path.resolve()
    loader = FgcLoader(search_path_for(config_path, include_dirs))
    nonrepro: dict[str, str] = {}
    env = _make_environment(loader, nonrepro)
    root = loader.load_file(config_path.name, config_path)
    context = {
        "config_dir": str(config_path.parent),
        "hostname": socket.gethostname(),
        "uname": platform.uname()._asdict(),
        "versions": {"python": sys.version.split()[0]},
    }
    context.update(variables or {})
    try:
        template = env.get_template(str(config_path))
        text = template.render(context)
    except FgcError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        file = str(Path(exc.filename).resolve()) if exc.filename else str(config_path)
        raise FgcError(f"template syntax: {exc.message}", _location(loader, file, exc.lineno)) from None
    except jinja2.TemplateNotFound as exc:
        frame = _template_frame(exc, loader)
        loc = _location(loader, *frame) if frame else Location(str(config_path))
        raise FgcError(
            f"template not found: {exc.name!r}",
            loc,
            hint="searched: " + ", ".join(str(p) for p in loader.search_path),
        ) from None
    except RecursionError:
        cycle = _find_cycle(loader, root)
        if not cycle:
            raise FgcError(
                "extends/include cycle: the templates include or extend each other without end",
                Location(str(config_path)),
            ) from None
        steps = ", ".join(
            f"{display_path(str(tf.path))}:{ref.line} {_VERBS.get(ref.kind, ref.kind)} {ref.name!r}"
            for tf, ref in cycle
        )
        first, ref = cycle[0]
        raise FgcError(
            f"extends/include cycle: {steps}", _location(loader, str(first.path), ref.line)
        ) from None
    except (TemplateRaise, jinja2.TemplateError, jinja2.exceptions.SecurityError) as exc:
        frame = _template_frame(exc, loader)
        loc = _location(loader, *frame) if frame else Location(str(config_path))
        message = str(exc) if isinstance(exc, TemplateRaise) else f"template: {exc}"
        if isinstance(exc, jinja2.UndefinedError):
            message = f"undefined: {exc.message}"
        raise FgcError(message, loc) from None
    except Exception as exc:  # e.g. a TypeError of an expression: the template's mistake
        frame = _template_frame(exc, loader)
        if frame is None:
            raise
        message = f"template: {type(exc).__name__}: {exc}"
        raise FgcError(message, _location(loader, *frame)) from None
    text, origins = strip_markers(text)
    rendered = Rendered(text, origins, dict(loader.files), root, nonreproducible=nonrepro)
    for key in sorted(nonrepro):
        rendered.warnings.append(
            Diagnostic(
                f"the build is not reproducible: the config uses {key} = {nonrepro[key]!r}",
                Location(str(config_path)),
                severity="warning",
            )
        )
    return rendered
