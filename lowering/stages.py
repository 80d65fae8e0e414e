"""Pipeline stages: a balanced split of the decoder layers, and which rank runs each stage.

Pure functions over parameter counts, so that they are easy to test and to explain.
"""

from __future__ import annotations


def balanced_split(layer_params: list[int], stages: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Cut the layers into STAGES contiguous runs ``[start, end)`` of at least one layer each,
    minimising the largest stage's parameter count, then the sum of squared stage counts (so
    that the stages under the largest are even too). The first stage also holds FIRST_EXTRA
    parameters (the embedding), the last LAST_EXTRA (final norm and head). Deterministic.
    """
    n = len(layer_params)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0]
    for p in layer_params:
        prefix.append(prefix[-1] + p)

    def cost(stage: int, start: int, end: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)
        return prefix[end] - prefix[start] + extra

    # best[s][i]: the best (largest stage, sum of squares) over stages s.. when stage s starts at
    # layer i
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = (0, 0)
    for s in range(stages - 1, -1, -1):
        for i in range(s, n - (stages - 1 - s)):
            ends = range(n, i, -1) if s == stages - 1 else range(n - (stages - 1 - s), i, -1)
            for end in ends:
                if s == stages - 1 and end != n:
                    continue
                c, (rest_max, rest_sq) = cost(s, i, end), best[s + 1][end]
                value = (max(c, rest_max), c * c + rest_sq)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, end
    runs, start = [], 0
    for s in range(stages):
        end = cut[s][start]
        runs.append((start, end))
        start = end
    return runs


def stage_ranks(stages: int, ranks: int, layout: str) -> list[int]:
    """The pipeline rank of each stage: ``single`` (one stage per rank), ``loop`` (stage s on
    rank s mod RANKS) or ``v`` (rank r holds stages r and 2*RANKS-1-r)."""
    if layout == "v":
        return [s if s < ranks else 2 * ranks - 1 - s for s in range(stages)]
    return [s % ranks for s in range(stages)]
