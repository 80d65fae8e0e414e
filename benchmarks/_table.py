"""Printing a benchmark's rows as an aligned table, and optionally as CSV; timing a call; reading
`--shapes`."""

from __future__ import annotations

import argparse
import csv
import statistics
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


# A rate row's key for its rate in each round (a list; left out of the table and the CSV).
ROUNDS = "rounds"


def round_ratio(row: dict, other: dict) -> tuple[float, str]:
    """ROW's tokens/s over OTHER's, and the words saying how it was taken.

    When both rows have a rate for each of the same number of rounds (ROUNDS), the ratio is the
    median over the rounds of ROW's rate in a round over OTHER's in the same round: two loops
    timed minutes apart compare less well on a machine whose speed drifts than two timed in the
    same round. Else it is their best rates' ratio (tokens_per_s over tokens_per_s).
    """
    best = row["tokens_per_s"] / other["tokens_per_s"]
    mine, theirs = row.get(ROUNDS), other.get(ROUNDS)
    if not mine or not theirs or len(mine) != len(theirs):
        return best, "best over best"
    if len(mine) == 1:
        return mine[0] / theirs[0], "one round"
    ratios = [a / b for a, b in zip(mine, theirs)]
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return statistics.median(ratios), f"the median of {len(ratios)} rounds ({each}); best over best {best:.2f}x"


def print_table(rows: list[dict], csv_path: Path | None = None) -> None:
    """Print ROWS (dicts with the same keys) right-aligned under their keys; write CSV if asked.
    A row's ROUNDS is left out of both."""
    header = [key for key in rows[0] if key != ROUNDS]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r[h]).rjust(w) for h, w in zip(header, widths)))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
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
