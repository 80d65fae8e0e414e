"""Rebuild golden/<name>/ from examples/<name>/train.yaml, on purpose.

    python scripts/refresh_golden.py            # every golden package
    python scripts/refresh_golden.py tiny_llama # one

tests/test_codegen.py fails when a build differs from golden/; run this when the change is intended
and review `git diff golden/` before committing.
"""

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
        print(f"refreshed {out.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
