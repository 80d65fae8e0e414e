"""The registry of model families: one folder each (``fgc/families/NAME/``: ``SPEC``, its
template, its own parts), registered by name in :data:`NAMES`. Everything that needs to know the
families (the template loader, ``hf_config()``, the exporter, ``fgc explain``, the docs) iterates
:data:`FAMILIES`. docs/adding-a-family.md says how to add one.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import FamilySpec, TensorRule  # noqa: F401

# One line per family: its folder's name. The order is the exporter's: a model that fits several
# families is exported as the first.
NAMES = (
    "llama",
    "mistral",
    "qwen3",
    "olmo2",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "qwen2",
    "smollm3",
    "granite",
    "mixtral",
    "qwen3_moe",
    "gpt2",
    "gpt_neox",
)

FAMILIES: dict[str, FamilySpec] = {
    name: importlib.import_module(f"{__name__}.{name}").SPEC for name in NAMES
}
BY_MODEL_TYPE: dict[str, FamilySpec] = {
    spec.model_type: spec for spec in FAMILIES.values()
}
FAMILIES_DIR = Path(__file__).resolve().parent


def family_of_template(path: Path) -> FamilySpec | None:
    """The family whose template is the file PATH, if any."""
    path = Path(path).resolve()
    return next(
        (spec for spec in FAMILIES.values() if spec.template.resolve() == path), None
    )
