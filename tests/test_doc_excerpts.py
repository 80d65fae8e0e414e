"""The code the docs quote from the golden package is the golden package's code.

A page marks a fenced code block that quotes a file of the repository with a comment on the line
before it:

    <!-- excerpt: golden/tiny_llama/train.py -->

The block's lines, with the fence's indentation taken off, must appear in that file in order and
contiguous; a line that is only `...` stands for any number of the file's lines in between. When
the golden package changes (scripts/refresh_golden.py), a quoted excerpt that no longer matches
fails here, naming the page's line and the first line not found.

Every ```python block of the pages in EXCERPT_PAGES is either marked as an excerpt or marked
`<!-- not-an-excerpt: REASON -->` (a user's own code, a sketch), so that no quote of generated
code goes unchecked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

# the pages that quote the generated package
EXCERPT_PAGES = ["docs/package.md"]
_MARK = re.compile(r"^\s*<!--\s*(excerpt|not-an-excerpt):\s*(.*?)\s*-->\s*$")


def _blocks(text: str):
    """(line of the fence, its language, the marker's kind or None, the marker's argument, the
    block's lines without the fence's indentation) of each fenced block of TEXT."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            indent = len(line) - len(stripped)
            j = i + 1
            while not lines[j].lstrip().startswith("```"):
                j += 1
            mark = _MARK.match(lines[i - 1]) if i else None
            body = [l[indent:] for l in lines[i + 1 : j]]
            yield i + 1, stripped[3:].strip(), (mark.group(1) if mark else None), (mark.group(2) if mark else ""), body
            i = j
        i += 1


def _matches_at(segment: list[str], source: list[str], k: int) -> bool:
    """Whether SEGMENT is SOURCE's lines from K on, all indented by the same number of spaces
    more (a page quotes a function's body as it would a whole block)."""
    if k + len(segment) > len(source) or not source[k].endswith(segment[0]):
        return False
    indent = source[k][: len(source[k]) - len(segment[0])]
    if indent.strip(" "):
        return False
    return all(
        source[k + i] == (indent + line if line else "") for i, line in enumerate(segment)
    )


def excerpt_mismatch(body: list[str], source: list[str]) -> str | None:
    """None when BODY's segments (split at `...` lines) appear in SOURCE in order, each one's
    lines contiguous and equally indented; else the first line of BODY not found where it must be."""
    segments: list[list[str]] = [[]]
    for line in body:
        if line.strip() == "...":
            segments.append([])
        else:
            segments[-1].append(line)
    start = 0
    for segment in segments:
        if not segment:
            continue
        at = next((k for k in range(start, len(source)) if _matches_at(segment, source, k)), None)
        if at is None:
            # the longest prefix found, to name the line that differs
            for m in range(len(segment) - 1, 0, -1):
                if any(_matches_at(segment[:m], source, k) for k in range(start, len(source))):
                    return segment[m]
            return segment[0]
        start = at + len(segment)
    return None


def test_excerpt_mismatch_finds_missing_and_reordered_lines():
    source = ["a", "b", "c", "d", "e"]
    assert excerpt_mismatch(["b", "c"], source) is None
    assert excerpt_mismatch(["a", "...", "d", "e"], source) is None
    assert excerpt_mismatch(["b", "d"], source) == "d"  # not contiguous
    assert excerpt_mismatch(["d", "...", "b"], source) == "b"  # out of order
    assert excerpt_mismatch(["x"], source) == "x"
    indented = ["def f():", "    a = 1", "", "    return a"]
    assert excerpt_mismatch(["a = 1", "", "return a"], indented) is None  # one indent less
    assert excerpt_mismatch(["a = 1", "  return a"], indented) == "  return a"  # not uniform


@pytest.mark.parametrize("page", EXCERPT_PAGES)
def test_quoted_golden_code_is_the_golden_packages(page):
    text = (REPO / page).read_text(encoding="utf-8")
    checked, problems = 0, []
    for line, lang, kind, arg, body in _blocks(text):
        if kind == "excerpt":
            path = REPO / arg
            assert path.is_file(), f"{page}:{line}: the excerpt names {arg}, which does not exist"
            missing = excerpt_mismatch(body, path.read_text(encoding="utf-8").splitlines())
            if missing is not None:
                problems.append(f"{page}:{line}: not in {arg}: {missing!r}")
            checked += 1
        elif lang == "python" and kind is None:
            problems.append(f"{page}:{line}: a python block with neither an excerpt nor a not-an-excerpt mark")
    assert not problems, "\n".join(problems)
    if page == "docs/package.md":
        assert checked >= 8  # the anatomy of train.py and model.py quotes the golden package
