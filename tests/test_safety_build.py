"""`fgc build` never deletes a file it did not write (issue #13, items 2, 3, 14 and 17).

One test (or a few) per point of the agreed design, in order: the checks on `-o DIR`; directories
never built over; a forced build into a directory that is not an fgc build; a rebuild (kept
entries, hand edits); atomicity; leftovers of killed builds; `fgc check` and the golden refresh.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, run_fgc, small_config
from fgc.build import build_package, compile_config
from fgc.errors import FgcError


def listing(root: Path) -> dict[str, tuple]:
    """Everything under ROOT, hidden entries included: directories, links and files with bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def generated(out: Path) -> dict[str, bytes]:
    """The files OUT's manifest lists, as they are on disk."""
    outputs = json.loads((out / "manifest.json").read_text())["outputs"]
    return {rel: (out / rel).read_bytes() for rel in outputs}


def assert_matches_manifest(out: Path) -> None:
    """Every file OUT's manifest lists has the bytes the manifest says."""
    outputs = json.loads((out / "manifest.json").read_text())["outputs"]
    for rel, digest in outputs.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel


def add_user_files(out: Path) -> None:
    """What a run from inside the package leaves there (train.py's default --output-dir is
    `output`, relative to where it runs), a note, and Python's caches."""
    ckpt = out / "output" / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"weights \x00\x01")
    (out / "output" / "checkpoints" / "latest").write_text("step-00000003\n")
    (out / "output" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (out / "notes.txt").write_text("lr 3e-4 diverged at step 900\n")
    for cache in (out / "__pycache__", out / "fgc_runtime" / "__pycache__"):
        cache.mkdir()
        (cache / "x.cpython-311.pyc").write_bytes(b"\x00pyc")


def user_entries(out: Path) -> dict[str, tuple]:
    """The part of OUT's listing that add_user_files made."""
    return {
        rel: v
        for rel, v in listing(out).items()
        if rel.split("/")[0] in ("output", "notes.txt", "__pycache__") or "__pycache__" in rel
    }


def one_line(exc: FgcError) -> str:
    """The error as the CLI prints it, asserted to be one line."""
    text = "\n".join(d.format() for d in exc.diagnostics)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return small_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def compiled(cfg):
    return compile_config(cfg)


def run_patched(patch: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`fgc ARGS` in a new process after running PATCH (Python) in it."""
    code = (
        textwrap.dedent(patch)
        + "\nimport sys\nfrom fgc.cli import main\nsys.argv = ['fgc', *sys.argv[1:]]\nmain()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd or REPO, capture_output=True, text=True
    )


# -- 1. -o DIR ----------------------------------------------------------------------------------
def test_output_path_that_is_a_file_or_a_link_is_refused(tmp_path, cfg, compiled):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    proc = run_fgc("build", cfg, "-o", a_file, "--force", "--no-smoke")
    assert proc.returncode == 2
    assert proc.stderr == f"{a_file}: error: the output path exists and is not a directory\n"
    assert a_file.read_text() == "mine\n"

    real = tmp_path / "real"
    build_package(compiled, real, smoke=False)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = listing(tmp_path)
    for extra in ((), ("--force",)):
        proc = run_fgc("build", cfg, "-o", link, "--no-smoke", *extra)
        assert proc.returncode == 2
        assert proc.stderr == (
            f"{link}: error: the output directory is a symbolic link; pass the real path: -o {real}\n"
        )
        assert listing(tmp_path) == before


def test_unwritable_parent_is_a_one_line_error(tmp_path, compiled, monkeypatch):
    # tests may run as root, where chmod prevents nothing: make creating anything under locked/ fail
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(FgcError) as exc:
        build_package(compiled, locked / "out", smoke=False)
    assert one_line(exc.value) == f"{locked}/out: error: cannot write in {locked}: Permission denied"
    with pytest.raises(FgcError) as exc:
        build_package(compiled, locked / "sub" / "out", smoke=False)
    assert one_line(exc.value) == f"{locked}/sub/out: error: cannot create {locked}/sub: Permission denied"
    assert listing(tmp_path) == {"locked": ("dir",)}


def test_full_disk_is_a_one_line_error_and_changes_nothing(tmp_path, cfg, compiled):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    add_user_files(out)
    before = listing(tmp_path)
    full = """
        import errno, os
        from fgc.codegen.package import Package
        write = Package.write
        def full(self, root):
            if "model.py" in self.files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write(self, root)
        Package.write = full
    """
    proc = run_patched(full, "build", cfg, "-o", out, "-D", "max_steps=7", "--no-smoke")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"{out}: error: cannot write {out}/model.py: No space left on device; "
        "the output directory was left as it was\n"
    )
    assert listing(tmp_path) == before  # the temporary directory is gone too


# -- 2. directories never built over -------------------------------------------------------------
def test_force_never_builds_over_the_config_its_inputs_or_the_current_directory(tmp_path):
    # `fgc build cfg.yaml -o . --force` from the config's folder deleted the folder
    project = tmp_path / "project"
    project.mkdir()
    cfg = small_config(project)
    (project / "notes.txt").write_text("keep\n")
    before = listing(tmp_path)
    proc = run_fgc("build", "cfg.yaml", "-o", ".", "--force", "--no-smoke", cwd=project)
    assert proc.returncode == 2
    assert proc.stderr == (
        ".: error: the output directory is the current directory: fgc never builds into it, "
        "even with --force\n"
    )
    assert listing(tmp_path) == before
    proc = run_fgc("build", "cfg.yaml", "-o", project, "--force", "--no-smoke", cwd=project)  # -o "$PWD"
    assert proc.returncode == 2
    assert proc.stderr.startswith(".: error: the output directory is the current directory: ")
    assert listing(tmp_path) == before

    # an ancestor of the current directory
    inner = project / "a" / "b"
    inner.mkdir(parents=True)
    before = listing(tmp_path)
    proc = run_fgc("build", cfg, "-o", project, "--force", "--no-smoke", cwd=inner)
    assert proc.returncode == 2
    assert "error: the output directory holds the current directory: fgc never builds into it" in proc.stderr
    assert listing(tmp_path) == before

    # the config's folder, from elsewhere
    proc = run_fgc("build", cfg, "-o", project, "--force", "--no-smoke", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "project: error: the output directory holds the config file project/cfg.yaml: "
        "fgc never builds into it, even with --force\n"
    )
    assert listing(tmp_path) == before

    # a folder holding a template the config extends (through -I) and one holding its text input
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "base.yaml").write_text('-- extends "lm/train.yaml"\n')
    (tmp_path / "texts").mkdir()
    shutil.copy(project / "corpus.txt", tmp_path / "texts" / "corpus.txt")
    child = tmp_path / "child"
    child.mkdir()
    (child / "cfg.yaml").write_text(
        cfg.read_text()
        .replace('-- extends "lm/train.yaml"', '-- extends "base.yaml"')
        .replace("text_files: [corpus.txt]", "text_files: [../texts/corpus.txt]")
    )
    before = listing(tmp_path)
    proc = run_fgc(
        "build", child / "cfg.yaml", "-I", "inc", "-o", "inc", "--force", "--no-smoke", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "inc: error: the output directory holds the template inc/base.yaml: fgc never"
    )
    proc = run_fgc(
        "build", child / "cfg.yaml", "-I", "inc", "-o", "texts", "--force", "--no-smoke", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "texts: error: the output directory holds the input texts/corpus.txt: fgc never"
    )
    assert listing(tmp_path) == before


# -- 3. --force into a directory that is not an fgc build -----------------------------------------
def test_force_adds_the_package_and_keeps_every_entry(tmp_path, cfg):
    out = tmp_path / "mine"
    (out / "runs" / "old").mkdir(parents=True)
    (out / "runs" / "old" / "model.pt").write_bytes(b"\x00weights")
    (out / "notes.txt").write_text("keep me\n")
    before = listing(out)
    refused = run_fgc("build", cfg, "-o", out, "--no-smoke")
    assert refused.returncode == 2 and "not empty" in refused.stderr and "--force" in refused.stderr
    assert listing(out) == before

    proc = run_fgc("build", cfg, "-o", out, "--force", "--no-smoke")
    assert proc.returncode == 0, proc.stderr
    after = listing(out)
    assert {rel: after[rel] for rel in before} == before  # every entry kept, byte for byte
    assert_matches_manifest(out)
    assert proc.stderr.splitlines()[-2] == "fgc: kept 2 entries fgc did not write: notes.txt, runs/"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_entry_where_the_package_writes_is_refused_even_with_force(tmp_path, compiled):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.py").write_text("# my own trainer\n")
    (out / "data").mkdir()
    (out / "data" / "shards.bin").write_bytes(b"\x01\x02")
    before = listing(tmp_path)
    with pytest.raises(FgcError) as exc:
        build_package(compiled, out, force=True, smoke=False)
    assert one_line(exc.value) == (
        f"{out}: error: data and train.py are in the way of the package, and fgc did not write them; "
        "move them away first"
    )
    assert listing(tmp_path) == before


# -- 4. a rebuild: fgc's files replaced, edits refused, everything else kept -------------------------
def test_rebuild_keeps_checkpoints_written_inside_the_package(tmp_path, cfg, compiled):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    add_user_files(out)  # cd build && torchrun train.py: checkpoints in build/output/
    kept = user_entries(out)
    proc = run_fgc("build", cfg, "-o", "build", "-D", "max_steps=5", "--no-smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-2] == "fgc: kept 2 entries fgc did not write: notes.txt, output/"  # caches kept quietly
    assert lines[-1] == "fgc: built build (basic trainer); run: python build/train.py"
    assert user_entries(out) == kept
    assert "MAX_STEPS = 5" in (out / "train.py").read_text()
    assert_matches_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_hand_edits_are_refused_unless_forced(tmp_path, cfg, compiled):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    fresh = generated(out)
    (out / "train.py").write_text(fresh["train.py"].decode() + "# my fix\n")
    (out / "model.py").write_text("# rewritten\n")
    before = listing(tmp_path)
    proc = run_fgc("build", cfg, "-o", out, "--no-smoke")
    assert proc.returncode == 2
    assert proc.stderr == (
        f"{out}: error: model.py and train.py were edited since fgc wrote them; "
        "pass --force to overwrite them\n"
    )
    assert listing(tmp_path) == before
    forced = run_fgc("build", cfg, "-o", out, "--no-smoke", "--force")
    assert forced.returncode == 0, forced.stderr
    assert generated(out) == fresh
    assert "kept" not in forced.stderr


def test_a_kept_entry_where_the_new_package_writes_is_refused(tmp_path, compiled):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    (out / "launch.sh").unlink()
    (out / "launch.sh").mkdir()  # no longer the file fgc wrote: someone else's
    (out / "launch.sh" / "mine.txt").write_text("x")
    before = listing(tmp_path)
    for force in (False, True):
        with pytest.raises(FgcError) as exc:
            build_package(compiled, out, force=force, smoke=False)
        assert one_line(exc.value) == (
            f"{out}: error: launch.sh is in the way of the package, and fgc did not write it; "
            "move it away first"
        )
        assert listing(tmp_path) == before


# -- 5. atomicity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", ["notes.txt", "build"])
def test_a_failure_after_the_first_move_puts_everything_back(tmp_path, compiled, monkeypatch, fail_at):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    add_user_files(out)
    before = listing(tmp_path)
    real_rename = os.rename

    # notes.txt: a kept entry cannot be moved (others already were); build: the output directory
    # cannot be moved away, after every kept entry was
    victim = out / "notes.txt" if fail_at == "notes.txt" else out

    def rename(src, dst):
        if Path(src) == victim:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(FgcError) as exc:
        build_package(compiled, out, smoke=False)
    what = "move notes.txt into the new package" if fail_at == "notes.txt" else f"replace {out}"
    assert one_line(exc.value) == (
        f"{out}: error: cannot {what}: Device or resource busy; the output directory was left as it was"
    )
    assert listing(tmp_path) == before


def test_the_old_directory_loses_only_the_files_fgc_wrote(tmp_path, compiled, monkeypatch):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    add_user_files(out)
    kept = user_entries(out)
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if Path(src) == out:  # a trainer still running in the old directory writes a log there
            (Path(dst) / "output").mkdir()
            (Path(dst) / "output" / "late.log").write_text("step 4\n")

    monkeypatch.setattr(os, "rename", rename)
    notes = []
    assert build_package(compiled, out, smoke=False, note=notes.append)
    olds = [p for p in tmp_path.iterdir() if p.name.startswith(".build.old-")]
    assert len(olds) == 1 and listing(olds[0]) == {
        "output": ("dir",),
        "output/late.log": ("file", b"step 4\n"),
    }
    assert notes == [
        f"{olds[0]}: warning: left output here: fgc did not write it or cannot delete it",
        "fgc: kept 2 entries fgc did not write: notes.txt, output/",
    ]
    assert user_entries(out) == kept
    assert_matches_manifest(out)


# -- 6. leftovers of a killed build ----------------------------------------------------------------
KILL_WHILE_CARRYING = """
    import os
    import fgc.build
    move = fgc.build._move
    def killed(src, dest):
        move(src, dest)
        os._exit(137)  # killed after carrying the first kept entry into the new package
    fgc.build._move = killed
"""
KILL_WHILE_SWAPPING = """
    import os
    rename = os.rename
    def killed(src, dst):
        rename(src, dst)
        if ".old-" in os.fspath(dst):
            os._exit(137)  # killed with the old directory moved away and the new one not yet in place
    os.rename = killed
"""


@pytest.mark.parametrize("kill", [KILL_WHILE_CARRYING, KILL_WHILE_SWAPPING], ids=["carrying", "swapping"])
def test_the_next_build_cleans_what_a_killed_build_left(tmp_path, cfg, compiled, kill):
    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    add_user_files(out)
    kept = user_entries(out)
    killed = run_patched(kill, "build", cfg, "-o", out, "-D", "max_steps=5", "--no-smoke")
    assert killed.returncode == 137, killed.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "build")
    assert leftovers and all(n.startswith((".build.tmp-", ".build.old-")) for n in leftovers)

    notes = []
    build_package(compiled, out, smoke=False, note=notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
    assert user_entries(out) == kept
    assert_matches_manifest(out)
    assert "MAX_STEPS = 3" in (out / "train.py").read_text()
    assert notes[-1] == "fgc: kept 2 entries fgc did not write: notes.txt, output/"
    assert all(n.startswith("fgc: restored ") or n.startswith("fgc: cleaned ") for n in notes[:-1]), notes


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_directories_fgc_cannot_claim_are_left(tmp_path, compiled):
    import socket

    out = tmp_path / "build"
    build_package(compiled, out, smoke=False)
    (out / "notes.txt").write_text("the current notes\n")
    # a killed build's temporary directory, made the way a build makes it: the marker, part of
    # the package, and notes.txt being carried over (the output directory has one again since)
    pid = dead_pid()
    stale = tmp_path / f".build.tmp-{pid}-0badc0de"
    (stale / "fgc_runtime").mkdir(parents=True)
    files = sorted(generated(out)) + ["manifest.json"]
    marker = {"format": "fgc-build-tmp", "pid": pid, "host": socket.gethostname(), "files": files}
    (stale / ".fgc-build-tmp.json").write_text(json.dumps(marker))
    (stale / "train.py").write_text("# half written")
    (stale / "fgc_runtime" / "__init__.py").write_text("")
    (stale / "notes.txt").write_text("older notes\n")
    (stale / "runs").mkdir()
    (stale / "runs" / "a.pt").write_bytes(b"\x00")
    # one of a build still running (pid 1 is alive), and one fgc did not mark
    running = tmp_path / ".build.tmp-1-00c0ffee"
    running.mkdir()
    (running / "train.py").write_text("# being written")
    unmarked = tmp_path / f".build.tmp-{dead_pid()}-0ddba11e"
    unmarked.mkdir()
    (unmarked / "train.py").write_text("# whose?")
    before = {p: listing(p) for p in (running, unmarked)}

    notes = []
    build_package(compiled, out, smoke=False, note=notes.append)
    assert listing(stale) == {"notes.txt": ("file", b"older notes\n")}
    assert (out / "notes.txt").read_text() == "the current notes\n"
    assert (out / "runs" / "a.pt").read_bytes() == b"\x00"  # moved back, then kept
    assert {p: listing(p) for p in (running, unmarked)} == before
    assert f"{stale}: warning: left notes.txt here: {out} already has an entry of that name" in notes
    assert (
        f"{unmarked}: warning: left in place: it holds no fgc marker, so fgc cannot tell what it wrote"
        in notes
    )
    assert notes[-1] == "fgc: kept 2 entries fgc did not write: notes.txt, runs/"


# -- 7. fgc check and the golden refresh ---------------------------------------------------------------
def test_check_and_a_golden_refresh_over_an_earlier_build_work(tmp_path, cfg):
    proc = run_fgc("check", cfg)
    assert proc.returncode == 0, proc.stderr
    golden = tmp_path / "tiny_llama"
    shutil.copytree(REPO / "golden" / "tiny_llama", golden)
    for cache in (golden / "__pycache__",):  # golden/ has no fgc_runtime/ (scripts/refresh_golden.py)
        cache.mkdir(exist_ok=True)  # as a test run leaves them
        (cache / "x.cpython-311.pyc").write_bytes(b"\x00pyc")
    proc = run_fgc("build", EXAMPLE, "-o", golden)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"fgc: built {golden} ")
    assert "kept" not in proc.stderr  # Python's caches are kept quietly
    assert (golden / "__pycache__" / "x.cpython-311.pyc").read_bytes() == b"\x00pyc"
    assert_matches_manifest(golden)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_llama"]
