"""What a training package writes, deletes, loads and trains on (issue #13, items 1, 4, 5, 6, 10).

- `--export-hf DIR` and `final/` replace only a missing or empty directory or an earlier export
  (its `fgc-export.json`), keeping files the user added to it;
- `--resume never` refuses an output dir that holds a run unless `--overwrite`;
- a nan or infinite loss or gradient norm stops the run before the optimizer step (or, with
  `--nonfinite skip`, drops that step's update), and non-finite weights are never saved or exported;
- checkpoints record each file's size and sha256; `--resume auto` falls back from a damaged one;
- every checkpoint file loads with `weights_only=True`: a crafted pickle never runs.

The first part drives the runtime (`fgc_runtime`) directly; the second builds small packages and
runs their train.py, injecting failures with wrapper scripts that patch a runtime function (the
generated code has no test hooks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE, run_fgc, tree_bytes
from fgc_runtime import checkpoint, hf
from fgc_runtime.errors import RunError

# ---- the runtime ----------------------------------------------------------------------------


@pytest.fixture
def package(tmp_path) -> Path:
    """A directory with the `hf_config.json` an export reads (a package's, reduced)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    spec = {"config": {"model_type": "llama"}, "generation_config": {}, "tied": {}, "remote_code": False}
    (pkg / "hf_config.json").write_text(json.dumps(spec))
    return pkg


def weights(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"model.w": torch.full((2, 3), value), "lm_head.weight": torch.full((4, 3), value)}


def tokenizer_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


def test_export_writes_a_marker_listing_its_files(tmp_path, package):
    out = tmp_path / "exports" / "hf"
    hf.export(weights(), out, package)
    marker = json.loads((out / "fgc-export.json").read_text())
    assert marker == {
        "format": "fgc-hf-export",
        "version": 1,
        "files": ["config.json", "generation_config.json", "model.safetensors"],
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(marker["files"] + ["fgc-export.json"])
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # nothing left beside it


@pytest.mark.parametrize("kind", ["user files", "a file", "bad marker", "marker escaping the dir"])
def test_export_refuses_what_is_not_an_earlier_export(tmp_path, package, kind):
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "data").mkdir()
        (out / "data" / "train.bin").write_bytes(b"\x00" * 8)
        if kind == "bad marker":
            (out / "fgc-export.json").write_text("not json")
        elif kind == "marker escaping the dir":
            (out / "fgc-export.json").write_text(
                json.dumps({"format": "fgc-hf-export", "version": 1, "files": ["../victim.txt", "notes.txt"]})
            )
    (tmp_path / "victim.txt").write_text("keep me")
    before = tree_bytes(tmp_path)
    with pytest.raises(RunError) as info:
        hf.export(weights(), out, package)
    assert info.value.path == str(out)
    assert "not replacing this directory" in info.value.message or "not a directory" in info.value.message
    assert "\n" not in str(info.value)
    assert tree_bytes(tmp_path) == before  # nothing touched


def test_export_into_an_empty_directory(tmp_path, package):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    hf.export(weights(), out, package)
    assert out.stat().st_ino == inode  # written into it, not swapped for another directory
    assert (out / "model.safetensors").is_file() and (out / "fgc-export.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_replacing_an_export_keeps_the_files_the_user_added(tmp_path, package):
    out = tmp_path / "out"
    hf.export(weights(1.0), out, package, tokenizer_dirs=[tokenizer_dir(tmp_path)])
    assert "tokenizer.json" in json.loads((out / "fgc-export.json").read_text())["files"]
    (out / "NOTES.md").write_text("my notes")
    (out / "evals").mkdir()
    (out / "evals" / "scores.json").write_text("[1, 2]")

    hf.export(weights(2.0), out, package)  # no tokenizer this time
    names = sorted(p.name for p in out.iterdir())
    assert names == ["NOTES.md", "config.json", "evals", "fgc-export.json", "generation_config.json",
                     "model.safetensors"]
    assert (out / "NOTES.md").read_text() == "my notes"
    assert (out / "evals" / "scores.json").read_text() == "[1, 2]"
    assert json.loads((out / "fgc-export.json").read_text())["files"] == [
        "config.json", "generation_config.json", "model.safetensors"
    ]
    from fgc_runtime import safetensors

    assert torch.equal(safetensors.index_dir(out)["model.w"].get("model.w"), torch.full((2, 3), 2.0))


def test_a_file_added_by_hand_that_the_new_export_writes_is_refused(tmp_path, package):
    out = tmp_path / "out"
    hf.export(weights(), out, package)
    (out / "tokenizer.json").write_text("the user's own")
    tokenizer = tokenizer_dir(tmp_path)
    before = tree_bytes(tmp_path)
    with pytest.raises(RunError) as info:
        hf.export(weights(2.0), out, package, tokenizer_dirs=[tokenizer])
    assert str(info.value) == (
        f"{out}: error: tokenizer.json was added to this export by hand, and the new export writes a file of "
        "that name: move it away first"
    )
    assert tree_bytes(tmp_path) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".fgc-export-")]


def test_export_refuses_weights_that_are_not_finite(tmp_path, package):
    state = weights()
    state["lm_head.weight"][1, 2] = float("inf")
    with pytest.raises(RunError) as info:
        hf.export(state, tmp_path / "out", package)
    assert str(info.value) == (
        f"{tmp_path / 'out'}: error: not exporting weights that are not finite: tensor 'lm_head.weight' holds inf"
    )
    assert not (tmp_path / "out").exists()


def test_check_export_dir_writes_nothing_and_ends_with_the_hint(tmp_path):
    final = tmp_path / "final"
    hf.check_export_dir(final)  # missing: fine
    assert not final.exists()
    final.mkdir()
    hf.check_export_dir(final)  # empty: fine
    (final / "x").write_text("mine")
    with pytest.raises(RunError) as info:
        hf.check_export_dir(final, "move it away")
    assert info.value.path == str(final) and info.value.message.endswith("; move it away")


# -- checkpoints


def make_checkpoint(out: Path, step: int, *, rank_state=None, keep_last_n=None, value=None) -> Path:
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    if value is not None:
        with torch.no_grad():
            model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return checkpoint.save_checkpoint(
        out,
        step=step,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        trainer_state={"step": step, "tokens_seen": step, "config_hash": "h"},
        keep_last_n=keep_last_n,
        rank_state=rank_state,
    )


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_the_manifest_records_each_files_size_and_sha256(tmp_path):
    path = make_checkpoint(tmp_path, 3, rank_state={"mine": torch.ones(2)})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert sorted(manifest["contents"]) == sorted(manifest["files"])
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        assert manifest["contents"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint.verify_checkpoint(path) is None


def as_version_1(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["contents"]
    manifest["version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_version_1_checkpoint_still_loads_and_is_checked_by_its_zip_crcs(tmp_path):
    path = make_checkpoint(tmp_path, 3)
    as_version_1(path)
    assert checkpoint.verify_checkpoint(path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) == path
    assert checkpoint.load_checkpoint(path)["trainer_state"]["step"] == 3
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    assert "optimizer.pt is damaged" in checkpoint.verify_checkpoint(path)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda p: truncate(p / "model.pt"), "model.pt has 100 bytes, its manifest says "),
        (lambda p: flip_a_byte(p / "optimizer.pt"), "optimizer.pt does not match the sha256 its manifest records"),
        (lambda p: (p / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    ],
)
def test_auto_falls_back_from_a_damaged_newest_checkpoint_with_a_warning(tmp_path, capsys, damage, problem):
    good = make_checkpoint(tmp_path, 2)
    bad = make_checkpoint(tmp_path, 4)
    damage(bad)
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"warning: {tmp_path / 'checkpoints'}: step-00000004: {problem}")
    assert err[0].endswith("; resuming from step-00000002")
    # --export-hf without --checkpoint takes the same checkpoint
    assert hf.export_checkpoint_dir(None, tmp_path) == good
    assert "exporting step-00000002" in capsys.readouterr().err
    # a damaged checkpoint named on the command line is a one-line error
    with pytest.raises(RunError) as info:
        checkpoint.resolve_resume(str(bad), tmp_path)
    assert info.value.path == str(bad) and "\n" not in str(info.value)
    assert info.value.message.startswith(f"damaged checkpoint: {problem}")


@pytest.mark.parametrize(
    "latest,what",
    [
        (b"\x00\xffgarbage", "latest does not name a checkpoint"),
        (b"step-00000009\n", "latest names step-00000009, which does not exist"),
    ],
)
def test_a_bad_latest_falls_back_with_a_warning(tmp_path, capsys, latest, what):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoints" / "latest").write_bytes(latest)
    assert checkpoint.resolve_resume("auto", tmp_path) == newest
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and err[0].endswith("; resuming from step-00000004")


def test_no_checkpoint_that_verifies_is_an_error(tmp_path):
    truncate(make_checkpoint(tmp_path, 2) / "model.pt")
    with pytest.raises(RunError) as info:
        checkpoint.resolve_resume("auto", tmp_path)
    assert info.value.path == str(tmp_path / "checkpoints")
    assert info.value.message.startswith("no checkpoint here verifies (step-00000002: model.pt has 100 bytes")
    assert "--resume never --overwrite" in info.value.message


def test_retention_never_deletes_the_newest_checkpoint_that_verifies(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step)
    truncate(tmp_path / "checkpoints" / "step-00000300" / "model.pt")
    # a run resumed from step 100 (by path) saves step 150 keeping one: 200 is the newest good one
    make_checkpoint(tmp_path, 150, keep_last_n=1)
    assert names(tmp_path) == ["latest", "step-00000150", "step-00000200", "step-00000300"]


class RunsCode:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("victim", ["model.pt", "optimizer.pt", "trainer_state.pt", "rng-rank0.pt", "state-rank0.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path, victim):
    path = make_checkpoint(tmp_path / "run", 5, rank_state={"model": {"w": torch.ones(2)}})
    marker = tmp_path / "ran"
    torch.save({"state": RunsCode(marker)}, path / victim)
    # the manifest's sums are updated too: only loading without unpickling code stops it
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["contents"][victim] = checkpoint.file_digest(path / victim)
    (path / "manifest.json").write_text(json.dumps(manifest))

    refusal = "not loaded: it holds a pickled posix.system, not only tensors and plain data (loading it could run code)"
    with pytest.raises(RunError) as info:
        checkpoint.resolve_resume(str(path), tmp_path)
    assert str(info.value) == f"{path}: error: damaged checkpoint: {victim}: {refusal}"
    with pytest.raises(RunError) as info:
        checkpoint.resolve_resume("auto", tmp_path / "run")
    assert info.value.message.startswith(f"no checkpoint here verifies (step-00000005: {victim}: {refusal})")
    with pytest.raises(RunError) as info:
        checkpoint.load_checkpoint(path)
    assert str(info.value) == f"{path / victim}: error: {refusal}"
    assert not marker.exists()


def test_no_torch_load_in_fgc_or_its_runtime_unpickles_code():
    repo = Path(__file__).resolve().parent.parent
    sources = [*repo.joinpath("fgc").rglob("*.py"), *repo.joinpath("runtime").rglob("*.py"),
               *repo.joinpath("codegen_templates").rglob("*.j2")]
    for path in sources:
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load" not in text and "pickle.loads" not in text, path


# -- non-finite values


def test_nonfinite_names_the_first_value_that_is_not_finite():
    assert checkpoint.nonfinite(loss=torch.tensor(2.0), gradient_norm=1.5) is None
    assert checkpoint.nonfinite(loss=torch.tensor(float("nan")), gradient_norm=float("inf")) == "the loss is nan"
    assert checkpoint.nonfinite(loss=1.0, gradient_norm=float("-inf")) == "the gradient norm is -inf"
    assert checkpoint.nonfinite(loss=1.0, gradient_norm=None) is None  # not measured


def test_non_finite_weights_are_never_saved(tmp_path):
    good = make_checkpoint(tmp_path, 5)
    before = tree_bytes(tmp_path)
    with pytest.raises(RunError) as info:
        make_checkpoint(tmp_path, 7, value=float("nan"))
    assert str(info.value) == (
        f"{tmp_path}: error: step 7: the model's weights are not finite (tensor 'weight' holds nan); "
        "not saving them; the newest checkpoint (step-00000005) is untouched"
    )
    assert tree_bytes(tmp_path) == before
    assert checkpoint.verify_checkpoint(good) is None


# -- --resume never


def test_resume_never_refuses_an_output_dir_that_holds_a_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert checkpoint.choose_resume("never", out) is None  # an empty metrics file is no run
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    with pytest.raises(RunError) as info:
        checkpoint.choose_resume("never", out)
    assert str(info.value) == (
        f"{out}: error: this output dir holds a run (metrics.jsonl with 2 records), which --resume never would "
        "replace: pass --overwrite to start over, or --resume auto to continue it"
    )
    make_checkpoint(out, 2)
    make_checkpoint(out, 4)
    before = tree_bytes(out)
    with pytest.raises(RunError) as info:
        checkpoint.choose_resume("never", out)
    assert "(2 checkpoints (the newest step-00000004) and metrics.jsonl with 2 records)" in info.value.message
    assert tree_bytes(out) == before
    with pytest.raises(RunError) as info:
        checkpoint.choose_resume("auto", out, overwrite=True)
    assert str(info.value) == "error: --overwrite starts a run over: it goes with --resume never"
    assert checkpoint.choose_resume("never", out, overwrite=True) is None
    assert names(out) == []
    assert (out / "metrics.jsonl").exists()  # emptied by the run's metrics logger, which starts at step 0


# ---- the package, end to end ----------------------------------------------------------------

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# a safety net against a hung trainer; no assertion is made on time
SAFETY_TIMEOUT_S = 900
KNOBS = ["-D", "max_steps=6", "-D", "eval_every=0", "-D", "num_hidden_layers=1", "-D", "seq_len=32"]

# Patch: with NAN_LOSS_STEP (and NAN_GRAD_STEP) set, the loss of that step is nan (its gradients
# are nan with a finite loss), on rank NAN_RANK only (default: every rank).
NAN_PATCH = """
import os, runpy, sys
import torch
build = sys.argv[1]
sys.path.insert(0, build)
RANK = int(os.environ.get("RANK", "0"))
import fgc_runtime.data as data
import fgc_runtime.train as train
step = [0]
batch = data.BatchSampler.batch
def patched_batch(self, index):
    step[0] = index + 1
    return batch(self, index)
data.BatchSampler.batch = patched_batch
class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)
    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")
loss = train.loss_sum_and_count
def patched_loss(logits, labels, **kwargs):
    loss_sum, count = loss(logits, labels, **kwargs)
    here = os.environ.get("NAN_RANK") in (None, str(RANK))
    if here and str(step[0]) == os.environ.get("NAN_LOSS_STEP"):
        loss_sum = loss_sum * float("nan")
    if here and str(step[0]) == os.environ.get("NAN_GRAD_STEP"):
        loss_sum = NanGrad.apply(loss_sum)
    return loss_sum, count
train.loss_sum_and_count = patched_loss
sys.argv = [os.path.join(build, "train.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def python(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=dict(ENV, **(env or {})), timeout=SAFETY_TIMEOUT_S)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Packages:
    """A basic and a DDP package of the main example, small, built once; a short run of the basic
    one (4 steps, checkpoints at 2 and 4) and an uninterrupted one (6 steps), made when needed."""

    def __init__(self, root: Path):
        self.root = root
        self.basic, self.ddp = root / "basic", root / "ddp"
        run_fgc("build", EXAMPLE, "-o", self.basic, *KNOBS, "-D", "trainer_type=basic", check=True)
        run_fgc("build", EXAMPLE, "-o", self.ddp, *KNOBS, "-D", "trainer_type=ddp", check=True)
        self.nan_script = root / "nan.py"
        self.nan_script.write_text(NAN_PATCH)
        self._short = self._full = None

    def short_run(self, dest: Path) -> Path:
        """A copy, at DEST, of a 4-step run with checkpoints at steps 2 and 4."""
        if self._short is None:
            self._short = self.root / "short"
            proc = python(self.basic / "train.py", "--output-dir", self._short, "--max-steps", "4",
                          "--save-every", "2", "--log-every", "1", cwd=self.root)
            assert proc.returncode == 0, proc.stderr[-3000:]
        shutil.copytree(self._short, dest)
        return dest

    def full_run(self) -> list[dict]:
        """The records of the uninterrupted 6-step run."""
        if self._full is None:
            self._full = self.root / "full"
            proc = python(self.basic / "train.py", "--output-dir", self._full, "--log-every", "1", cwd=self.root)
            assert proc.returncode == 0, proc.stderr[-3000:]
        return records(self._full)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory) -> Packages:
    return Packages(tmp_path_factory.mktemp("packages"))


@pytest.mark.slow
def test_export_hf_into_the_working_directory_is_refused(pkgs, tmp_path):
    run = pkgs.short_run(tmp_path / "run")
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    (work / "src").mkdir()
    (work / "src" / "main.py").write_text("print('hi')")
    before = tree_bytes(work)
    proc = python(pkgs.basic / "train.py", "--output-dir", run, "--export-hf", work, cwd=work)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{work}: error: not replacing this directory: it is not empty and it has no fgc-export.json, so it is "
        "not an earlier export (an export replaces only those); choose an empty or new directory"
    ]
    assert tree_bytes(work) == before
    # into a new directory, then again over that export: fine, and a file added there is kept
    out = tmp_path / "hf"
    assert python(pkgs.basic / "train.py", "--output-dir", run, "--export-hf", out, cwd=tmp_path).returncode == 0
    (out / "README.md").write_text("my model card")
    again = python(pkgs.basic / "train.py", "--output-dir", run, "--export-hf", out, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "README.md").read_text() == "my model card"
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_users_final_directory_is_refused_before_training(pkgs, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "weights.bin").write_bytes(b"the user's")
    proc = python(pkgs.basic / "train.py", "--output-dir", run, "--log-every", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{run / 'final'}: error: not replacing this directory: it is not empty and it has no fgc-export.json, "
        "so it is not an earlier export (an export replaces only those); the end of training exports the model "
        "there: move it away, or use another --output-dir"
    ]
    assert "step 1 |" not in proc.stdout  # refused before training
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "final" / "weights.bin").read_bytes() == b"the user's"


@pytest.mark.slow
def test_resume_never_refuses_a_run_and_overwrite_starts_over(pkgs, tmp_path):
    run = pkgs.short_run(tmp_path / "run")
    before = tree_bytes(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()
    proc = python(pkgs.basic / "train.py", "--output-dir", run, "--resume", "never", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{run}: error: this output dir holds a run (2 checkpoints (the newest step-00000004) and metrics.jsonl "
        "with 4 records), which --resume never would replace: pass --overwrite to start over, or --resume auto "
        "to continue it"
    ]
    assert (tree_bytes(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()) == before
    # a dry run writes nothing, so it is not refused
    dry = python(pkgs.basic / "train.py", "--output-dir", run, "--resume", "never", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert (tree_bytes(run / "checkpoints"), (run / "metrics.jsonl").read_bytes()) == before

    over = python(pkgs.basic / "train.py", "--output-dir", run, "--resume", "never", "--overwrite",
                  "--max-steps", "1", "--log-every", "1", cwd=tmp_path)
    assert over.returncode == 0, over.stderr[-3000:]
    assert "resuming" not in over.stdout
    assert names(run) == ["latest", "step-00000001"]
    assert [r["step"] for r in records(run)] == [1]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_resume_is_exact(pkgs, tmp_path):
    full = pkgs.full_run()
    run = pkgs.short_run(tmp_path / "run")
    newest = run / "checkpoints" / "step-00000004"
    size = (newest / "model.pt").stat().st_size
    truncate(newest / "model.pt")
    (run / "checkpoints" / "latest").write_text("garbage\n")

    named = python(pkgs.basic / "train.py", "--output-dir", run, "--resume", newest, cwd=tmp_path)
    assert named.returncode == 2
    assert named.stderr.strip().splitlines() == [
        f"{newest}: error: damaged checkpoint: model.pt has 100 bytes, its manifest says {size:,}"
    ]

    resumed = python(pkgs.basic / "train.py", "--output-dir", run, "--log-every", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {run / 'checkpoints'}: latest does not name a checkpoint ('garbage'); step-00000004: "
        f"model.pt has 100 bytes, its manifest says {size:,}; resuming from step-00000002"
    ]
    assert f"resuming from {run / 'checkpoints' / 'step-00000002'} at step 2" in resumed.stdout
    assert [(r["step"], r["loss"]) for r in records(run)] == [(r["step"], r["loss"]) for r in full]


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_on_resume(pkgs, tmp_path):
    run = pkgs.short_run(tmp_path / "run")
    marker = tmp_path / "ran"
    for step in (2, 4):
        path = run / "checkpoints" / f"step-{step:08d}"
        torch.save({"lr_scheduler": RunsCode(marker)}, path / "trainer_state.pt")
        manifest = json.loads((path / "manifest.json").read_text())
        if "contents" in manifest:  # the sums match: only loading without unpickling code stops it
            manifest["contents"]["trainer_state.pt"] = checkpoint.file_digest(path / "trainer_state.pt")
        (path / "manifest.json").write_text(json.dumps(manifest))
    path = run / "checkpoints" / "step-00000004"
    named = python(pkgs.basic / "train.py", "--output-dir", run, "--resume", path, cwd=tmp_path)
    assert named.returncode == 2
    assert named.stderr.strip().splitlines() == [
        f"{path}: error: damaged checkpoint: trainer_state.pt: not loaded: it holds a pickled posix.system, not "
        "only tensors and plain data (loading it could run code)"
    ]
    auto = python(pkgs.basic / "train.py", "--output-dir", run, cwd=tmp_path)
    assert auto.returncode == 2 and len(auto.stderr.strip().splitlines()) == 1
    assert "no checkpoint here verifies" in auto.stderr and "Traceback" not in auto.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_optimizer_step(pkgs, tmp_path):
    run = tmp_path / "run"
    proc = python(pkgs.nan_script, pkgs.basic, "--output-dir", run, "--save-every", "3", "--log-every", "1",
                  cwd=tmp_path, env={"NAN_LOSS_STEP": "5"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{run}: error: step 5: the loss is nan; stopping before the optimizer step; the newest checkpoint "
        "(step-00000003) is untouched"
    ]
    assert names(run) == ["latest", "step-00000003"]
    assert checkpoint.verify_checkpoint(run / "checkpoints" / "step-00000003") is None
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    assert not (run / "final").exists()


@pytest.mark.slow
def test_nonfinite_skip_drops_the_update_and_keeps_the_schedule(pkgs, tmp_path):
    full = pkgs.full_run()
    run = tmp_path / "run"
    proc = python(pkgs.nan_script, pkgs.basic, "--output-dir", run, "--log-every", "1", "--nonfinite", "skip",
                  cwd=tmp_path, env={"NAN_LOSS_STEP": "2", "NAN_GRAD_STEP": "4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "warning" in line] == [
        "[rank 0] warning: step 2: the loss is nan; its update is dropped (--nonfinite skip)",
        "[rank 0] warning: step 4: the gradient norm is nan; its update is dropped (--nonfinite skip)",
    ]
    got = records(run)
    assert [r.get("skipped_steps") for r in got] == [None, 1, None, 1, None, None]
    assert "step 2 | loss nan" in proc.stdout and "| skipped 1" in proc.stdout
    assert math.isnan(got[1]["loss"]) and math.isnan(got[3]["grad_norm"])
    assert [r["lr"] for r in got] == [r["lr"] for r in full]  # the schedule went on
    assert got[0]["loss"] == full[0]["loss"] and got[2]["loss"] != full[2]["loss"]
    assert math.isfinite(got[-1]["loss"])
    model = torch.load(run / "checkpoints" / "step-00000006" / "model.pt", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_both(pkgs, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(pkgs.nan_script),
           str(pkgs.ddp), "--output-dir", str(run), "--save-every", "2", "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=SAFETY_TIMEOUT_S,
                          env=dict(ENV, NAN_LOSS_STEP="3", NAN_RANK="1"))
    assert proc.returncode != 0
    line = (
        f"{run}: error: step 3: the loss is nan; stopping before the optimizer step; the newest checkpoint "
        "(step-00000002) is untouched"
    )
    # printed by rank 0, which got the nan of rank 1 through the loss all-reduce
    assert proc.stderr.splitlines().count(line) == 1
    assert names(run) == ["latest", "step-00000002"]
    assert checkpoint.verify_checkpoint(run / "checkpoints" / "step-00000002") is None
    assert [r["step"] for r in records(run)] == [1, 2]
