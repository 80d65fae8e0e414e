"""The compiler driver: config → rendered YAML → IR → lowered IR → package on disk."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Mapping

from .errors import Diagnostic, FgcError, Location, display_path
from .frontend.render import Rendered, render

if TYPE_CHECKING:  # lowering imports torch: only a config that renders and loads gets that far
    from fgc_lowering.context import LoweringContext

    from .ir import IRGraph


@dataclass
class Compiled:
    """A lowered config: its render, its IR and the lowering context (settings, plan, symbols)."""

    rendered: Rendered
    ir: IRGraph
    ctx: LoweringContext

    @property
    def warnings(self) -> list[Diagnostic]:
        return self.rendered.warnings + self.ctx.sink.warnings

    @functools.cached_property
    def program(self):
        """The training program (fgc_lowering.program.Program): codegen's single input."""
        return self.ctx.program(self.ir, self.rendered)


def compile_config(
    config: str | Path,
    include_dirs: tuple[str, ...] = (),
    variables: dict | None = None,
    dump_after: str | None = None,
    dump: Callable[[str], None] = print,
    project_dir: str | Path | None = None,
) -> Compiled:
    """Render, load and lower CONFIG; raises FgcError with every diagnostic found."""
    from .frontend.loader import load

    variables = dict(variables or {})
    rendered = render(config, include_dirs, variables, project_dir)
    ir = load(rendered)
    from fgc_lowering.construct import without_dynamo
    from fgc_lowering.context import LoweringContext
    from fgc_lowering.pipeline import lower

    ctx = LoweringContext(rendered.source.path, rendered.source.search_path, variables)
    ctx.template_names = rendered.referenced
    ctx.origins = rendered.origins_of  # where a knob printed at a template line was set
    try:
        with without_dynamo():  # the passes build the optimizer and schedule on dummy values
            ir = lower(ir, ctx, dump_after=dump_after, dump=dump)
    except FgcError as exc:
        raise FgcError(diagnostics=[with_origin(d, rendered) for d in exc.diagnostics]) from None
    return Compiled(rendered, ir, ctx)


def with_origin(diagnostic: Diagnostic, rendered: Rendered) -> Diagnostic:
    """Add where a knob printed at the error's line was set (a child's line, or a -D) as a hint."""
    if diagnostic.loc is None or diagnostic.loc.line is None:
        return diagnostic
    origins = rendered.origins_of(diagnostic.loc)[:-1]
    if not origins:
        return diagnostic
    loc, dvar = origins[-1]  # the assignment that won
    where = f"{display_path(loc.file)}:{loc.line}"
    note = f"the value was set by {dvar} at {where}" if dvar else f"the value was set at {where}"
    hint = f"{diagnostic.hint}; {note}" if diagnostic.hint else note
    return dataclasses.replace(diagnostic, hint=hint)


# -- the output directory ---------------------------------------------------------------------
# `fgc build` deletes only files it wrote (docs/safety.md): a generated file whose bytes are still
# those its manifest lists. Everything else in the output directory is kept, carried into the new
# package. Every deletion goes through remove_written.

MARKER = ".fgc-build-tmp.json"  # in a temporary build directory: whose it is and what fgc writes there
OWN_TOP = ("manifest.json", MARKER)  # fgc's files at a build's top that its "outputs" do not list
_LEFTOVER_RE = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})")


def _show(path: str | Path) -> str:
    return display_path(str(path))


def _names(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _it(items: list) -> str:
    return "it" if len(items) == 1 else "them"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _warn(note: Callable[[str], None], path: Path, message: str) -> None:
    note(Diagnostic(message, Location(str(path)), severity="warning").format())


def _ancestors(rels) -> set[str]:
    """Every directory on the way to the relative POSIX paths RELS (not ``.``)."""
    return {p.as_posix() for rel in rels for p in PurePosixPath(rel).parents if p.parts}


def output_path(out: Path) -> Path:
    """OUT as an absolute path with its parent resolved (OUT itself may be missing, or a link)."""
    absolute = Path(os.path.abspath(out))
    return absolute.parent.resolve() / absolute.name if absolute.name else absolute


def read_manifest(directory: Path) -> dict | None:
    """DIRECTORY's build manifest, or None when it holds no fgc build."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == "fgc-build" else None


def is_fgc_build(path: Path) -> bool:
    """Whether DIR holds an earlier fgc build (its manifest says so)."""
    return read_manifest(path) is not None


def manifest_outputs(manifest: dict | None) -> dict[str, str]:
    """The generated files a manifest lists (relative path → sha256); {} without a manifest."""
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict):
        return {}
    return {rel: h for rel, h in outputs.items() if isinstance(rel, str) and isinstance(h, str)}


def _sha256(path: str | Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None  # unreadable: counts as changed, so never deleted unasked
    return digest.hexdigest()


@dataclass
class Scan:
    """A directory's entries by who wrote them, as relative POSIX paths."""

    own: list[str] = field(default_factory=list)  # files fgc wrote, unchanged since
    edited: list[str] = field(default_factory=list)  # files fgc wrote whose bytes have changed
    others: list[str] = field(default_factory=list)  # entries fgc did not write (a directory whole)


def scan_dir(root: Path, listed: Mapping[str, str | None], top: tuple[str, ...] = ()) -> Scan:
    """Sort ROOT's entries. A regular file at a LISTED path, or named in TOP at ROOT's top, is
    fgc's: unchanged when its sha256 is the listed one (None: not checked). A directory on the
    way to a listed path is looked into. Anything else, links included, is someone else's."""
    dirs = _ancestors(listed)
    scan = Scan()

    def walk(rel_dir: str) -> None:
        with os.scandir(root / rel_dir if rel_dir else root) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_file(follow_symlinks=False) and (rel in listed or rel in top):
                    expected = listed.get(rel)
                    same = expected is None or _sha256(entry.path) == expected
                    (scan.own if same else scan.edited).append(rel)
                elif entry.is_dir(follow_symlinks=False) and rel in dirs:
                    walk(rel)
                else:
                    scan.others.append(rel)

    walk("")
    return scan


def remove_written(root: Path, rels: list[str]) -> list[str]:
    """Delete exactly the files RELS under ROOT (files fgc wrote; in this order), then the
    directories that held them and ROOT itself once empty. Returns what remains in ROOT (relative
    paths): what fgc did not write or could not delete. The only way fgc deletes anything."""
    for rel in rels:
        parts = PurePosixPath(rel).parts
        if not parts or parts[0] == "/" or ".." in parts:
            continue
        path = root.joinpath(*parts)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):  # never a link or a directory
                os.unlink(path)
        except OSError:
            pass  # already gone, or not deletable: what stays is reported below
    for rel_dir in sorted(_ancestors(rels), key=lambda d: d.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(root / rel_dir)  # only when empty; a link to a directory is no directory
    with contextlib.suppress(OSError):
        os.rmdir(root)
    if not os.path.isdir(root) or os.path.islink(root):
        return []
    left = scan_dir(root, dict.fromkeys(rels))
    return left.own + left.edited + left.others


def _move(src: Path, dest: Path) -> None:
    """Rename SRC to DEST, never over an existing DEST (os.rename would replace a file)."""
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest))
    os.rename(src, dest)


def _make_dirs(path: Path) -> list[Path]:
    """Create PATH and its missing parents; returns the directories created, outermost first."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        os.mkdir(directory)
    return missing[::-1]


def _remove_dirs(created: list[Path]) -> None:
    """Remove the directories _make_dirs created, innermost first, where they are still empty."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# -- checks ---------------------------------------------------------------------------------------
def _check_path(out: Path, target: Path) -> None:
    """OUT may be a directory (or nothing yet), but not a link, a file or the current directory."""
    if os.path.islink(target):
        real = _show(os.path.realpath(target))
        raise FgcError(
            f"the output directory is a symbolic link; pass the real path: -o {real}", Location(str(out))
        )
    if os.path.lexists(target) and not target.is_dir():
        raise FgcError("the output path exists and is not a directory", Location(str(out)))
    refuse_protected(out, target, [(Path.cwd(), "the current directory")])


def refuse_protected(out: Path, target: Path, protected: list[tuple[Path, str]]) -> None:
    """Refuse, even with --force, an output directory that is or holds one of PROTECTED's
    paths (path, what it is)."""
    if not target.is_dir():
        return
    real = target.resolve()
    for path, what in protected:
        path = Path(os.path.realpath(path))
        if path == real or real in path.parents:
            verb = "is" if path == real else "holds"
            raise FgcError(
                f"the output directory {verb} {what}: fgc never builds into it, even with --force",
                Location(str(out)),
            )


def protected_inputs(program, data_inputs: list[Path]) -> list[tuple[Path, str]]:
    """What a build never builds over: the current directory, the config, every template the
    render read and every directory it searched (-I included), and what the package is made
    from (text files, the pretrained model directory) or reads by default (the data directory)."""
    rendered, settings = program.source, program.settings
    config = Path(rendered.source.path)
    found = [(Path.cwd(), "the current directory"), (config, f"the config file {_show(config)}")]
    found += [(f.path, f"the template {_show(f.path)}") for f in rendered.files.values()]
    found += [(d, f"the template directory {_show(d)}") for d in rendered.source.search_path]
    found += [(p, f"the input {_show(p)}") for p in data_inputs]
    if settings.pretrained.model_dir:
        model_dir = settings.pretrained.model_dir
        found.append((Path(model_dir), f"the pretrained model directory {_show(model_dir)}"))
    if settings.data.data_dir:
        found.append((Path(settings.data.data_dir), f"the data directory {_show(settings.data.data_dir)}"))
    return found


def check_output_dir(out: Path, force: bool) -> Scan | None:
    """The checks on OUT that need no compiled config; returns what OUT holds (None: no OUT).

    Refused: a link, a file, the current directory (or one above it); a non-empty directory
    that holds no fgc build, unless forced; generated files edited since, unless forced."""
    out = Path(out)
    target = output_path(out)
    _check_path(out, target)
    if not target.is_dir():
        return None
    manifest = read_manifest(target)
    scan = scan_dir(target, manifest_outputs(manifest), OWN_TOP if manifest else ())
    if manifest is None and scan.others and not force:
        raise FgcError(
            "the output directory is not empty and holds no fgc build",
            Location(str(out)),
            hint="choose another directory, or pass --force to add the package to it (its files are kept)",
        )
    if scan.edited and not force:
        edited, it = scan.edited, _it(scan.edited)
        were = "was" if len(edited) == 1 else "were"
        raise FgcError(
            f"{_names(edited)} {were} edited since fgc wrote {it}; pass --force to overwrite {it}",
            Location(str(out)),
        )
    return scan


def refuse_clashes(out: Path, kept: list[str], files: Mapping[str, bytes]) -> None:
    """Refuse, even with --force, entries fgc did not write where the package writes a file
    (or needs a directory)."""
    dirs = _ancestors(files)
    clashes = [rel for rel in kept if rel in files or rel in dirs or _ancestors([rel]) & set(files)]
    if clashes:
        it, are = _it(clashes), "is" if len(clashes) == 1 else "are"
        raise FgcError(
            f"{_names(clashes)} {are} in the way of the package, and fgc did not write {it}; "
            f"move {it} away first",
            Location(str(out)),
        )


# -- leftovers of interrupted builds --------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Whether process PID may still be running (a pid that cannot be checked counts as alive)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's process, or no pid at all: not fgc's to judge
    return True


def _read_marker(tmp: Path) -> dict | None:
    try:
        marker = json.loads((tmp / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and marker.get("format") == "fgc-build-tmp"):
        return None
    if not (isinstance(marker.get("files"), list) and all(isinstance(f, str) for f in marker["files"])):
        return None
    return marker


def clean_leftovers(target: Path, note: Callable[[str], None] = _to_stderr) -> None:
    """Clean what builds into TARGET left beside it when they were killed (their process gone):
    ``.NAME.old-PID-TOKEN`` (TARGET's previous contents) and ``.NAME.tmp-PID-TOKEN`` (the new
    package, with the marker). Old directories go first, so that TARGET is whole again before
    the entries carried into a temporary directory are moved back into it."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    head = f".{target.name}."
    found = []
    for entry in entries:
        match = _LEFTOVER_RE.fullmatch(entry.name[len(head) :]) if entry.name.startswith(head) else None
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match["pid"])):
            found.append((match["kind"], entry.name, entry))
    for kind, _, entry in sorted(found):  # "old" before "tmp"
        if kind == "old":
            _recover_old(entry, target, note)
        else:
            _recover_tmp(entry, target, note)


def _recover_old(old: Path, target: Path, note: Callable[[str], None]) -> None:
    """A killed build's old directory: back in place when TARGET is missing (killed mid-swap),
    else its unchanged fgc files are deleted."""
    if not os.path.lexists(target):
        try:
            os.rename(old, target)
        except OSError as exc:
            _warn(note, old, f"left in place: cannot move it back to {_show(target)}: {exc.strerror}")
            return
        note(f"fgc: restored {_show(target)} from {_show(old)}, left by an interrupted build")
        return
    _remove_old(old, force=False, note=note)
    note(f"fgc: cleaned {_show(old)}, left by an interrupted build")


def _recover_tmp(tmp: Path, target: Path, note: Callable[[str], None]) -> None:
    """A killed build's temporary directory: the files its marker lists are deleted; every other
    entry (a user's, being carried over) moves back into TARGET where that name is free."""
    marker = _read_marker(tmp)
    if marker is None:
        left = remove_written(tmp, [])  # an empty one was killed before writing its marker
        if left:
            _warn(note, tmp, "left in place: it holds no fgc marker, so fgc cannot tell what it wrote")
        return
    if marker.get("host") != socket.gethostname():
        return  # another machine's build: its pid says nothing here
    scan = scan_dir(tmp, dict.fromkeys(marker["files"]), (MARKER,))
    stuck = []
    for rel in scan.others:
        try:
            _make_dirs((target / rel).parent)
            _move(tmp / rel, target / rel)
        except OSError:
            stuck.append(rel)
    left = remove_written(tmp, sorted(set(scan.own) - {MARKER}) + [MARKER])
    note(f"fgc: cleaned {_show(tmp)}, left by an interrupted build")
    if left and set(left) <= set(stuck):
        name = "an entry of that name" if len(left) == 1 else "entries of those names"
        _warn(note, tmp, f"left {_names(left)} here: {_show(target)} already has {name}")
    elif left:
        _warn(
            note, tmp, f"left {_names(left)} here: fgc did not write {_it(left)} or cannot delete {_it(left)}"
        )


def _remove_old(old: Path, force: bool, note: Callable[[str], None]) -> None:
    """Delete the files fgc wrote in OLD (an output directory's previous contents): those its
    manifest lists, unchanged (changed ones too when FORCE), the manifest last; warn about the rest."""
    manifest = read_manifest(old)
    scan = scan_dir(old, manifest_outputs(manifest), OWN_TOP if manifest else ())
    rels = sorted(scan.own + (scan.edited if force else []), key=lambda rel: rel == "manifest.json")
    left = remove_written(old, rels)
    if left:
        _warn(
            note, old, f"left {_names(left)} here: fgc did not write {_it(left)} or cannot delete {_it(left)}"
        )


# -- writing and installing the package -----------------------------------------------------------
def _make_tmp(out: Path, target: Path, files: Mapping[str, bytes]) -> Path:
    """A new temporary directory beside TARGET, ``.NAME.tmp-PID-TOKEN``, holding the marker that
    lets a later build clean it up if this one is killed."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    marker = {"format": "fgc-build-tmp", "pid": os.getpid(), "host": socket.gethostname()}
    marker["files"] = sorted(files)
    try:
        os.mkdir(tmp)  # mode 0o777 less the umask, like any directory the user makes
    except OSError as exc:
        raise FgcError(
            f"cannot write in {_show(target.parent)}: {exc.strerror}", Location(str(out))
        ) from None
    try:
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        remove_written(tmp, [MARKER])
        raise FgcError(
            f"cannot write in {_show(target.parent)}: {exc.strerror}", Location(str(out))
        ) from None
    return tmp


def _write_files(out: Path, tmp: Path, files: Mapping[str, bytes]) -> None:
    """Write FILES into TMP one at a time, so that a failure (a full disk) names the file."""
    from .codegen.package import Package

    for rel in sorted(files):
        try:
            Package({rel: files[rel]}).write(tmp)
        except OSError as exc:
            raise FgcError(
                f"cannot write {_show(out / rel)}: {exc.strerror or exc}; "
                "the output directory was left as it was",
                Location(str(out)),
            ) from None


def _smoke(program, tmp: Path) -> None:
    """The smoke check of PROGRAM's package in TMP, writing no __pycache__ into the package."""
    from .codegen.smoke import smoke_check

    ir, symbols = program.graph, program.symbols
    model_nodes = ir.reachable(ir.targets["model"])
    callables = {symbols[n].qualname.split(".")[-1]: ir.node(n).loc for n in model_nodes if n in symbols}
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        smoke_check(tmp, ir.node(ir.targets["model"]).loc, callables)
    finally:
        sys.dont_write_bytecode = saved


def _install(out: Path, target: Path, tmp: Path, kept: list[str]) -> Path | None:
    """Move KEPT (relative paths) from TARGET into TMP, then put TMP in TARGET's place. Returns
    the directory now holding TARGET's previous contents (None: there was no TARGET). On any
    failure everything is moved back, TARGET is as it was, and TMP holds only fgc's files."""
    head, _, tail = tmp.name.rpartition(".tmp-")
    old = tmp.with_name(f"{head}.old-{tail}")
    carried: list[str] = []
    made: list[Path] = []
    step = f"replace {_show(out)}"
    try:
        for rel in kept:
            step = f"move {rel} into the new package"
            made += _make_dirs((tmp / rel).parent)
            _move(target / rel, tmp / rel)
            carried.append(rel)
        step = f"replace {_show(out)}"
        if not os.path.lexists(target):
            os.rename(tmp, target)
            return None
        os.rename(target, old)
        os.rename(tmp, target)
        return old
    except BaseException as exc:
        stuck = _undo_install(target, tmp, old, carried, made)
        if not isinstance(exc, OSError):
            raise
        message = f"cannot {step}: {exc.strerror or exc}; the output directory was left as it was"
        if stuck:
            message += f", except {_names(stuck)}, left in {_show(tmp)}"
        raise FgcError(message, Location(str(out))) from None


def _undo_install(target: Path, tmp: Path, old: Path, carried: list[str], made: list[Path]) -> list[str]:
    """Put TARGET back as it was before _install; returns the carried entries that could not be
    moved back (they stay in TMP)."""
    if not tmp.exists():
        return []  # interrupted just after the swap: the build is complete; OLD is cleaned next time
    if os.path.lexists(old) and not os.path.lexists(target):
        with contextlib.suppress(OSError):
            os.rename(old, target)
    stuck = []
    for rel in reversed(carried):
        try:
            _move(tmp / rel, target / rel)
        except OSError:
            stuck.append(rel)
    _remove_dirs(made)
    return sorted(stuck)


def _shown_kept(target: Path, kept: list[str]) -> list[str]:
    """KEPT as the kept line shows it: directories with a slash, Python caches left out."""
    shown = []
    for rel in kept:
        if PurePosixPath(rel).name == "__pycache__":
            continue
        path = target / rel
        shown.append(rel + "/" if path.is_dir() and not path.is_symlink() else rel)
    return shown


def build_package(
    compiled: Compiled,
    out: Path,
    force: bool = False,
    smoke: bool = True,
    note: Callable[[str], None] = _to_stderr,
) -> list[str]:
    """Generate the package and install it in OUT; returns the entries of OUT kept (docs/safety.md).

    The package is written and smoke-checked in a temporary directory beside OUT; then the
    entries of OUT that fgc did not write are moved into it and it takes OUT's place. Of OUT's
    previous contents only the files the earlier build wrote (per its manifest) are deleted. On
    any error OUT is left as it was. NOTE receives the kept line and warnings."""
    from .codegen.package import PackageBuilder

    out = Path(out)
    target = output_path(out)
    _check_path(out, target)
    builder = PackageBuilder(compiled.program)
    package = builder.build()
    refuse_protected(out, target, protected_inputs(compiled.program, builder.data_inputs))
    clean_leftovers(target, note)
    scan = check_output_dir(out, force)  # after the cleanup, which may have moved entries back
    kept = scan.others if scan else []
    refuse_clashes(out, kept, package.files)
    try:
        created = _make_dirs(target.parent)
    except OSError as exc:
        raise FgcError(
            f"cannot create {_show(exc.filename or target.parent)}: {exc.strerror}", Location(str(out))
        ) from None
    tmp = None
    try:
        tmp = _make_tmp(out, target, package.files)
        _write_files(out, tmp, package.files)
        if smoke:
            _smoke(compiled.program, tmp)
        old = _install(out, target, tmp, kept)
    except BaseException:
        if tmp is not None:
            left = remove_written(tmp, sorted(package.files) + [MARKER])
            if left:
                _warn(note, tmp, f"left {_names(left)} here: fgc did not write {_it(left)}")
        _remove_dirs(created)
        raise
    with contextlib.suppress(OSError):
        os.unlink(target / MARKER)
    if old is not None:
        _remove_old(old, force, note)
    shown = _shown_kept(target, kept)
    if shown:
        entries = "entry" if len(shown) == 1 else "entries"
        note(f"fgc: kept {len(shown)} {entries} fgc did not write: {', '.join(shown)}")
    return kept


def check_config(config, include_dirs=(), variables=None, project_dir=None) -> Compiled:
    """Everything `fgc build` checks, smoke check included, writing nothing that stays."""
    compiled = compile_config(config, include_dirs, variables, project_dir=project_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_package(compiled, Path(tmp) / "package")
    return compiled
