"""fgc's packages for setuptools (the rest of the metadata is in pyproject.toml): the fixed ones,
and one per model family folder, found here so that adding a family takes no line in this file."""

from pathlib import Path

from setuptools import setup

FAMILIES = sorted(path.parent.name for path in (Path(__file__).parent / "fgc" / "families").glob("*/__init__.py"))

setup(
    packages=[
        "fgc", "fgc.frontend", "fgc.codegen", "fgc.components", "fgc.families",
        *(f"fgc.families.{name}" for name in FAMILIES),
        "fgc_lowering", "fgc_runtime", "fgc_runtime.kernels", "fgc_runtime.kernels.triton", "fgc_codegen_templates",
    ]
)
