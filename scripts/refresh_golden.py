"""Rebuild golden/<name>/ from examples/<name>/train.yaml, on purpose.

    python scripts/refresh_golden.py            # every golden package
    python scripts/refresh_golden.py tiny_llama # one

tests/test_codegen.py fails when a build differs from golden/; run this when the change is intended
and review `git diff golden/` before committing.

golden/<name>/ holds no fgc_runtime/: those files are runtime/ of this repository, copied verbatim,
and the test checks the built ones against the hashes golden's manifest.json lists (a changed
runtime module shows in `git diff golden/` as a changed hash).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(names):
    names = names or sorted(p.name for p in (REPO / "golden").iterdir() if p.is_dir())
    for name in names:
        config = REPO / "examples" / name / "train.yaml"
        out = REPO / "golden" / name
        subprocess.run(
            [sys.executable, "-m", "fgc", "build", str(config), "-o", str(out)], check=True, cwd=REPO
        )
        drop_runtime(out)
        print(f"refreshed {out.relative_to(REPO)}")


def drop_runtime(out: Path) -> None:
    """Delete the fgc_runtime/ files the build just wrote (those its manifest lists), then the
    directories left empty; anything else there (a Python cache) stays."""
    outputs = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["outputs"]
    runtime = [rel for rel in outputs if rel.startswith("fgc_runtime/")]
    for rel in runtime:
        (out / rel).unlink()
    for rel in sorted({os.path.dirname(r) for r in runtime}, key=lambda d: d.count("/"), reverse=True):
        if any((out / rel).iterdir()):
            print(f"kept {out / rel}: it holds files the build did not write (a Python cache?)")
        else:
            (out / rel).rmdir()


if __name__ == "__main__":
    main(sys.argv[1:])
