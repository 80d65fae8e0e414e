"""Printing a benchmark's rows as an aligned table, and optionally as CSV."""

from __future__ import annotations

import csv
from pathlib import Path


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
