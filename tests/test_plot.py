"""`fgc plot RUN_DIR... -o FILE.png`: several runs' curves on one figure (issue #19)."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from conftest import EXAMPLE, run_fgc
from fgc.errors import FgcError
from fgc.plot import SOFTWARE, plot_runs


def fake_run(path, losses, evals=(), tokens_per_s=1000.0):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": v, "lr": 1e-3, "tokens_per_s": tokens_per_s}) for s, v in losses]
    lines += [json.dumps({"step": s, "eval_loss": v}) for s, v in evals]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def legend(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_two_runs_one_figure_labelled_by_run(tmp_path):
    a = fake_run(tmp_path / "adamw", [(1, 5.0), (2, 4.0)], evals=[(2, 4.2)])
    b = fake_run(tmp_path / "sgd" / "output", [(1, 5.0), (2, 4.5)])  # named by the directory above output/
    fig = plot_runs([a, b.parent], tmp_path / "f.png")
    assert legend(fig) == ["adamw", "adamw (eval)", "sgd"]
    lines = fig.axes[0].get_lines()
    assert [list(l.get_ydata()) for l in lines] == [[5.0, 4.0], [4.2], [5.0, 4.5]]
    assert lines[1].get_linestyle() == "--" and lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    with Image.open(tmp_path / "f.png") as image:
        assert image.size == (800, 500) and image.info["Software"] == SOFTWARE
    fig = plot_runs([a, b.parent], tmp_path / "f.png", metric="tokens_per_s", labels=["one", "two"])  # over its own
    assert legend(fig) == ["one", "two"] and fig.axes[0].get_ylabel() == "tokens/s"


def test_mistakes_are_one_line_errors_and_nothing_is_overwritten(tmp_path):
    run = fake_run(tmp_path / "r", [(1, 5.0)])
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    proc = run_fgc("plot", run, "-o", mine)
    assert proc.returncode == 2 and mine.read_bytes() == b"my picture"
    assert proc.stderr == f"{mine}: error: exists and is not a figure fgc plot wrote: choose another -o, or move it away\n"
    proc = run_fgc("plot", tmp_path / "nope", "-o", tmp_path / "x.png")
    assert (proc.returncode, proc.stderr) == (2, f"{tmp_path / 'nope'}: error: no such run directory\n")
    (tmp_path / "empty").mkdir()
    proc = run_fgc("plot", tmp_path / "empty", "-o", tmp_path / "x.png")
    assert proc.returncode == 2 and "no metrics.jsonl here or in output/" in proc.stderr
    proc = run_fgc("plot", run, "-o", tmp_path / "x.png", "--metric", "mfu")
    assert proc.returncode == 2 and "error: no run logged 'mfu'" in proc.stderr and "hint: the runs logged: loss, lr, tokens_per_s" in proc.stderr
    proc = run_fgc("plot", run, "-o", tmp_path / "x.png", "--label", "a", "--label", "b")
    assert proc.returncode == 2 and "2 --label for 1 runs" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "r", [(1, 5.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(FgcError) as err:
        plot_runs([run], tmp_path / "x.png")
    assert 'pip install "fgc[plot]"' in str(err.value) and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_two_runs_of_the_main_example(tmp_path):
    flags = ["-D", "trainer_type=basic", "-D", "max_steps=6", "-D", "log_every=2", "-D", "eval_every=3", "-D", "seq_len=32"]
    for name, lr in (("lr3", "3.0e-3"), ("lr1", "1.0e-3")):
        run_fgc("build", EXAMPLE, "-o", tmp_path / name, *flags, "-D", f"lr={lr}", check=True)
        proc = __import__("subprocess").run(
            [sys.executable, str(tmp_path / name / "train.py"), "--output-dir", str(tmp_path / name / "output")],
            capture_output=True, text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_fgc("plot", tmp_path / "lr3", tmp_path / "lr1", "-o", tmp_path / "curves.png")
    assert proc.returncode == 0 and proc.stderr == f"fgc: wrote {tmp_path / 'curves.png'}\n"
    fig = plot_runs([tmp_path / "lr3", tmp_path / "lr1"], tmp_path / "curves.png")
    assert legend(fig) == ["lr3", "lr3 (eval)", "lr1", "lr1 (eval)"]
    steps = [list(l.get_xdata()) for l in fig.axes[0].get_lines()]
    assert steps == [[1, 2, 4, 6], [3, 6], [1, 2, 4, 6], [3, 6]]
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (800, 500)
