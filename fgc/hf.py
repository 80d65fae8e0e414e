"""Hugging Face models at build time: read a model directory's config.json, decide what to export.

Both directions ask the family registry (:mod:`fgc.families`), never a family's names.

Import: ``hf_config(model_dir)`` (a global of the config language) reads ``MODEL_DIR/config.json``,
finds the family of its ``model_type`` and checks every field against the family's spec: a field
the template cannot represent is an error naming it, at the config line that called
``hf_config``; a field transformers' model does not read is ignored, with a note.

Export: :func:`export_spec` looks at the model built on the meta device and asks each family's
spec whether the model is one of its own (the family of the config.json it was imported from
first): then it is exported as that family's transformers class; any other model as a custom
architecture, with modelling code and ``auto_map`` for ``trust_remote_code=True``. The result is
written into the package as ``hf_config.json``, which ``fgc_runtime.hf`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fgc_runtime.hf import _aliases

from .families import BY_MODEL_TYPE, FAMILIES, FamilySpec
from .families.base import STRUCTURE
from .frontend.environment import KnobRequired, TemplateRaise


def read_config_json(model_dir: str, nonrepro: dict[str, str] | None = None, notes: list | None = None) -> dict:
    """``hf_config(model_dir)``: MODEL_DIR's config.json, checked against its family's spec.

    Returns the config.json fields (``rope_theta`` always there, from ``rope_parameters`` if need
    be), plus ``model_dir`` (absolute) and ``fgc_template`` (the family template to extend). A
    relative MODEL_DIR is relative to the working directory (noted as making the build
    machine-specific). A field transformers' model does not read is ignored, with a line in NOTES;
    every other problem raises TemplateRaise naming the field.
    """
    if model_dir is None or model_dir == "":
        raise KnobRequired(
            "model_dir is not set: pass -D model_dir=PATH, a local Hugging Face model directory", "model_dir", "PATH"
        )
    given = str(model_dir)
    path = Path(os.path.abspath(os.path.expanduser(given)))
    if not os.path.isabs(os.path.expanduser(given)) and nonrepro is not None:
        nonrepro[f"hf_config({given})"] = str(path)
    if not path.is_dir():
        raise TemplateRaise(f"model_dir {given}: no such directory")
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateRaise(f"model_dir {given} has no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise TemplateRaise(f"{config_path}: cannot read it as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise TemplateRaise(f"{config_path}: not a JSON object")
    family = check_config(config, str(config_path), notes)
    out = dict(config)
    out["rope_theta"] = _rope_theta(config)
    out["model_dir"] = str(path)
    out["fgc_template"] = family.library_name
    return out


def check_config(config: dict, where: str, notes: list | None = None) -> FamilySpec:
    """The family of a config.json; TemplateRaise naming the first field its template cannot
    represent. Fields transformers' model for that model_type does not read are ignored: one line
    each in NOTES."""
    model_type = config.get("model_type")
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise TemplateRaise(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(BY_MODEL_TYPE))})"
        )
    problem, ignored = family.classify(config)
    if problem is not None:
        raise TemplateRaise(f"{where}: {problem}")
    if notes is not None:
        notes.extend(
            f"{where}: field {name} ({config[name]!r}) is ignored: transformers' {family.architecture} "
            "does not read it, so it does not change the model"
            for name in ignored
        )
    return family


def pretrained_vocab_size(model_dir: str) -> int | None:
    """The ``vocab_size`` of MODEL_DIR's config.json: the rows of the checkpoint's embedding.
    None when the file is missing, unreadable or has no positive integer ``vocab_size``
    (``hf_config`` reports a bad file at its own line)."""
    try:
        config = json.loads((Path(os.path.expanduser(str(model_dir))) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


# ---- export -----------------------------------------------------------------------------------

def export_spec(model, source: dict | None = None) -> dict:
    """What ``--export-hf`` writes for MODEL (built on the meta device): ``config``,
    ``generation_config``, ``tied`` (parameter name → the name it is tied to; written once) and
    ``remote_code``. SOURCE is the config.json the model was imported from, if any: the fields
    that do not describe the structure come from it."""
    tied = _aliases(model)  # the one definition the exporter uses too
    found = _family_config(model, source)
    if found is None or (tied and tied != {"lm_head.weight": "model.embed_tokens.weight"}):
        prefix = "fgc_model."
        config = {
            "architectures": ["FgcForCausalLM"],
            "model_type": "fgc",
            "auto_map": {
                "AutoConfig": "modeling_fgc.FgcConfig",
                "AutoModelForCausalLM": "modeling_fgc.FgcForCausalLM",
            },
            "tie_word_embeddings": bool(tied),
            "fgc_tied_weights": {prefix + k: prefix + v for k, v in sorted(tied.items())},
        }
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if isinstance(getattr(model, name, None), int):
                config[name] = getattr(model, name)
        for name in ("bos_token_id", "eos_token_id"):
            if source and source.get(name) is not None:
                config[name] = source[name]
        remote, family = True, None
    else:
        family, fields = found
        drop = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures")
        config = {k: v for k, v in (source or {}).items() if k not in drop}
        for name, value in fields.items():
            if source is None or name in STRUCTURE:
                config[name] = value
        config.update(model_type=family.model_type, architectures=[family.architecture])
        config.setdefault("bos_token_id", None)
        config.setdefault("eos_token_id", None)
        remote = False
    generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    spec = {
        "config": dict(sorted(config.items())),
        "generation_config": generation,
        "tied": dict(sorted(tied.items())),
        "remote_code": remote,
    }
    if family is not None and family.tensors:  # the family's tensor names, where they are not fgc's
        spec["tensors"] = [rule.to_data(config) for rule in family.tensors]
    return spec


def _family_config(model, source: dict | None) -> tuple[FamilySpec, dict] | None:
    """(family, config.json fields) of MODEL, or None when no family's spec recognises it: the
    family of the config.json it was imported from first, then the registry's order."""
    families = list(FAMILIES.values())
    first = BY_MODEL_TYPE.get((source or {}).get("model_type"))
    if first is not None:
        families.remove(first)
        families.insert(0, first)
    for family in families:
        fields = family.export_fields(model, source)
        if fields is not None:
            return family, fields
    return None
