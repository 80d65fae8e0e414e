"""`fgc diff A B`: what differs between two experiments (configs or build directories)."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path

from .build import compile_config, is_fgc_build
from .errors import FgcError, Location
from .ir import IRGraph


def resolved_values(ir: IRGraph) -> list[str]:
    """``key.path = value`` lines for every node the targets reach (values as the config resolves them)."""
    lines: list[str] = []

    def walk(nid: str, path: str, stack: tuple[str, ...]) -> None:
        node = ir.node(nid)
        if nid in stack:
            lines.append(f"{path} = <cycle>")
            return
        if node.kind == "value":
            lines.append(f"{path} = {node.value!r}")
            return
        if node.kind == "var":
            lines.append(f"{path} = !var {node.value}")
            return
        if node.kind == "call":
            lines.append(f"{path} = !{node.mode}:{node.spec}")
        elif not node.args and not node.kwargs:
            lines.append(f"{path} = {'{}' if node.kind == 'dict' else '[]'}")
        for i, child in enumerate(node.args):
            walk(child, f"{path}.{i}" if node.kind != "call" else f"{path}.arg{i}", stack + (nid,))
        for key, child in node.kwargs.items():
            walk(child, f"{path}.{key}", stack + (nid,))

    for name, nid in ir.targets.items():
        walk(nid, name, ())
    return lines


def package_files(
    path: Path, include_dirs=(), variables=None, project_dir=None
) -> tuple[dict[str, bytes], list[str] | None, dict[str, str]]:
    """The files of a build directory, or of the package a config builds (built in memory), the
    resolved values (configs only), and the sha256 of each file a build directory's manifest lists
    but does not hold (the golden packages keep only the hash of their vendored runtime).
    With PROJECT_DIR, a path that is not a directory is a config name in that project."""
    from .codegen.package import PackageBuilder

    if path.is_dir():
        if not is_fgc_build(path):
            raise FgcError("not an fgc build directory (no fgc manifest.json)", Location(str(path)))
        files = {
            p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }
        try:
            outputs = json.loads(files["manifest.json"]).get("outputs", {})
        except (ValueError, AttributeError):
            outputs = {}
        hashed = {rel: digest for rel, digest in outputs.items() if rel not in files and isinstance(digest, str)}
        return files, None, hashed
    compiled = compile_config(path, include_dirs, variables, project_dir=project_dir)
    package = PackageBuilder(compiled.program).build()
    return package.files, resolved_values(compiled.ir), {}


def diff_text(a: Path, b: Path, include_dirs=(), variables=None, project_dir=None) -> str:
    """A unified diff of the resolved values (configs only) and of the generated files
    (all but manifest.json, which only hashes the others)."""
    files_a, values_a, hashed_a = package_files(a, include_dirs, variables, project_dir)
    files_b, values_b, hashed_b = package_files(b, include_dirs, variables, project_dir)
    out: list[str] = []
    if values_a is not None and values_b is not None:
        out += difflib.unified_diff(
            [v + "\n" for v in values_a], [v + "\n" for v in values_b],
            f"{a} (resolved values)", f"{b} (resolved values)",
        )
    for rel in sorted(set(files_a) | set(files_b)):
        if rel == "manifest.json":
            continue  # hashes of the other files: derivable, and noise in a diff
        if rel not in files_b and rel in hashed_b:  # b keeps only the file's hash
            if hashlib.sha256(files_a[rel]).hexdigest() != hashed_b[rel]:
                out.append(f"Files a/{rel} and b/{rel} differ ({b} keeps only its hash)\n")
            continue
        if rel not in files_a and rel in hashed_a:
            if hashlib.sha256(files_b[rel]).hexdigest() != hashed_a[rel]:
                out.append(f"Files a/{rel} and b/{rel} differ ({a} keeps only its hash)\n")
            continue
        if rel not in files_b:
            out.append(f"Only in {a}: {rel}\n")
            continue
        if rel not in files_a:
            out.append(f"Only in {b}: {rel}\n")
            continue
        if files_a[rel] == files_b[rel]:
            continue
        try:
            text_a, text_b = files_a[rel].decode("utf-8"), files_b[rel].decode("utf-8")
        except UnicodeDecodeError:
            out.append(f"Binary files a/{rel} and b/{rel} differ\n")
            continue
        out += difflib.unified_diff(
            text_a.splitlines(keepends=True), text_b.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"
        )
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)
