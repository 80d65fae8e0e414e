"""Printing a benchmark's rows as an aligned table, and optionally as CSV; timing a call; reading
`--shapes`."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path


def best_ms(fn, reps: int, rounds: int) -> float:
    """The best of ROUNDS timings of REPS calls of FN, per call, in milliseconds (after 3 calls
    untimed)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return 1e3 * best


def print_table(rows: list[dict], csv_path: Path | None = None) -> None:
    """Print ROWS (dicts with the same keys) right-aligned under their keys; write CSV if asked."""
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r[h]).rjust(w) for h, w in zip(header, widths)))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)


def shape_names(parser: argparse.ArgumentParser, text: str, shapes: dict) -> list[str]:
    """The comma-separated shape names of TEXT (a `--shapes` value); an unknown one is PARSER's
    usage error (exit status 2) naming the SHAPES there are."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in shapes]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}: the shapes are {', '.join(shapes)}")
    return names
