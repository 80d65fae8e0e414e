"""``fgc plot RUN_DIR... -o FILE.png``: the curves of several runs on one figure.

A run is the output directory of a package's ``train.py`` (it holds ``metrics.jsonl``), or a
directory whose ``output/`` is one (a package run from inside it). Each run is one colour,
labelled by its directory; with the default metric, ``loss``, its evaluation loss is drawn in the
same colour, dashed, with markers. ``--metric`` draws another field of the training records
(``tokens_per_s``, ``lr``, ``grad_norm``, ``peak_mem_bytes``, ...) instead.

matplotlib is an optional extra (``pip install "fgc[plot]"``). The figure is written
atomically, and only over a file that is missing or an earlier ``fgc plot`` figure (its PNG
metadata says so), never over anything else.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .errors import FgcError, Location

SOFTWARE = "fgc plot"  # the PNG's Software text: marks a figure this command wrote
METRICS = "metrics.jsonl"
LABELS = {
    "loss": "loss",
    "tokens_per_s": "tokens/s",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "peak_mem_bytes": "peak memory (bytes)",
    "mfu": "MFU",
}


def metrics_file(run: Path) -> Path:
    """The ``metrics.jsonl`` of RUN (or of RUN/output); an FgcError naming RUN without one."""
    for candidate in (run / METRICS, run / "output" / METRICS):
        if candidate.is_file():
            return candidate
    if not run.exists():
        raise FgcError("no such run directory", Location(str(run)))
    raise FgcError(
        "no metrics.jsonl here or in output/: name a run's output directory (train.py --output-dir)",
        Location(str(run)),
    )


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl (a torn last line, from a run killed mid-write, is
    skipped; any other bad line is an error at its line)."""
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise FgcError("not a JSON record", Location(str(path), number)) from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite number under KEY."""
    points = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def run_labels(runs: list[Path]) -> list[str]:
    """A label per run: its directory's name (``output`` is named by its parent), or the path as
    given where two names would be the same."""
    names = []
    for run in runs:
        resolved = run.resolve()
        names.append(resolved.parent.name if resolved.name == "output" else resolved.name)
    if len(set(names)) < len(names):
        return [str(run) for run in runs]
    return names


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise FgcError(
            "fgc plot needs matplotlib, an optional extra: pip install \"fgc[plot]\" (or pip install matplotlib)",
            Location("<command line>"),
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _check_target(out: Path) -> None:
    """OUT must be missing, or a figure an earlier ``fgc plot`` wrote."""
    if out.suffix.lower() != ".png":
        raise FgcError("the figure is a PNG file: name it FILE.png", Location(str(out)))
    if not out.exists():
        if not out.parent.is_dir():
            raise FgcError("its directory does not exist", Location(str(out)))
        return
    software = None
    try:
        from PIL import Image

        with Image.open(out) as image:
            software = image.info.get("Software")
    except Exception:  # noqa: BLE001 - anything unreadable is not our figure
        software = None
    if software != SOFTWARE:
        raise FgcError(
            "exists and is not a figure fgc plot wrote: choose another -o, or move it away",
            Location(str(out)),
        )


def plot_runs(runs: list[Path], out: Path, metric: str = "loss", labels: list[str] | None = None):
    """Draw METRIC of each run of RUNS (with the eval loss, for ``loss``) into OUT; returns the
    matplotlib figure (closed: its artists can still be read)."""
    _check_target(out)
    data = [(run, read_records(metrics_file(run))) for run in runs]
    if labels is not None and len(labels) != len(runs):
        raise FgcError(f"{len(labels)} --label for {len(runs)} runs: give one per run, in order", Location("<command line>"))
    names = labels or run_labels(runs)
    if not any(series(records, metric)[0] for _, records in data):
        logged = sorted({k for _, records in data for r in records for k, v in r.items()
                         if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        raise FgcError(
            f"no run logged {metric!r}",
            Location("<command line>"),
            hint=f"the runs logged: {', '.join(logged) or 'nothing'}",
        )
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, ((run, records), name) in enumerate(zip(data, names)):
        colour = f"C{i % 10}"
        steps, values = series(records, metric)
        if steps:
            ax.plot(steps, values, color=colour, label=name)
        if metric == "loss":
            steps, values = series(records, "eval_loss")
            if steps:
                ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=3, label=f"{name} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel(LABELS.get(metric, metric))
    if metric in ("loss", "lr"):
        values = [v for _, records in data for v in series(records, metric)[1]]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # a loss that falls by orders of magnitude
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # written beside OUT, then renamed over it: a failure leaves OUT as it was
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", metadata={"Software": SOFTWARE})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return fig
