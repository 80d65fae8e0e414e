"""Hugging Face model directories: load their weights into a model; write a model as one.

A Hugging Face model directory holds ``config.json``, ``generation_config.json`` and the weights
as ``model.safetensors`` or as shards named by ``model.safetensors.index.json``. The parameter
names of fgc's component library are those of transformers' Llama-style models, so weights move
by name, unchanged. When the input embedding and the LM head are tied, transformers stores only
the embedding; both directions handle that.

What to write as ``config.json`` is decided at build time: ``fgc build`` writes it into the
package as ``hf_config.json`` (see :data:`EXPORT_SPEC`), because only the compiler knows whether
the model is a standard architecture. This module only reads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import quantize, safetensors
from .checkpoint import find_checkpoint, resolve_resume
from .errors import RunError

EXPORT_SPEC = "hf_config.json"  # in the package, beside train.py
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size is of this order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
REMOTE_PREFIX = "fgc_model."  # parameter names of a custom architecture inside its wrapper
# Non-persistent buffers that older transformers checkpoints still carry: never weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---- import ---------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, model_dir) -> None:
    """Copy the safetensors weights of the Hugging Face model directory MODEL_DIR into MODEL.

    Every parameter and persistent buffer of the model must be there with its shape, and every
    tensor there must belong to the model (a RunError naming the file otherwise; checked from
    the files' headers). A head tied to the embedding may be absent from the files, as
    transformers writes it. Values are cast to the model's dtype.

    Only what this process holds is read: a tensor still on the meta device (another pipeline
    stage's) is skipped, and a DTensor (an FSDP2 or tensor-parallel parameter) gets its shard.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RunError("no such Hugging Face model directory (see --weights)", path=model_dir)
    where = model_dir / (
        safetensors.INDEX_FILE if (model_dir / safetensors.INDEX_FILE).is_file() else safetensors.SINGLE_FILE
    )
    files = {k: v for k, v in safetensors.index_dir(model_dir).items() if not _IGNORED.search(k)}
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(model)  # name -> the first name of the same parameter
    sources = {}  # the model's name -> the name in the files
    for name, target in state.items():
        source = name if name in files else aliases.get(name)
        if source not in files:
            raise RunError(f"tensor {name!r} of the model is missing", path=where)
        shape = list(files[source].entries[source]["shape"])
        if shape != list(target.shape):
            raise RunError(f"tensor {name!r} has shape {shape}, the model's is {list(target.shape)}", path=where)
        sources[name] = source
    extra = sorted(set(files) - set(state))
    if extra:
        raise RunError(f"tensor {extra[0]!r} is not a parameter of the model", path=where)
    with torch.no_grad():
        for name, target in state.items():
            if target.is_meta:
                continue
            values = files[sources[name]].get(sources[name])
            if hasattr(target, "device_mesh"):  # a DTensor: this rank's shard
                from torch.distributed.tensor import distribute_tensor

                values = distribute_tensor(
                    values.to(device=target.device, dtype=target.dtype),
                    target.device_mesh,
                    target.placements,
                    src_data_rank=None,
                )
            target.copy_(values)


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """For each parameter reached under a second name (a tied weight), its first name."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


# ---- export ---------------------------------------------------------------------------------


def read_export_spec(package_dir) -> dict:
    """The package's ``hf_config.json``: ``config``, ``generation_config``, ``tied`` (target →
    source parameter names) and ``remote_code`` (True for a custom architecture)."""
    path = Path(package_dir) / EXPORT_SPEC
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise RunError("missing: the package cannot export a Hugging Face model without it", path=path) from None


def export_checkpoint_dir(arg: str | None, output_dir) -> Path:
    """The checkpoint ``--export-hf`` writes: ``--checkpoint PATH``, else the newest in OUTPUT_DIR."""
    if arg is not None:
        return resolve_resume(arg, output_dir)
    found = find_checkpoint(output_dir)
    if found is None:
        raise RunError(
            "no complete checkpoint to export (train first, or pass --checkpoint PATH)",
            path=Path(output_dir) / "checkpoints",
        )
    return found


def export_checkpoint(checkpoint_dir, out_dir, package_dir, **kwargs) -> Path:
    """Write the model of an fgc checkpoint as a Hugging Face model directory (see :func:`export`)."""
    path = Path(checkpoint_dir) / "model.pt"
    if not path.is_file():
        raise RunError("checkpoint file model.pt is missing", path=path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return export(state, out_dir, package_dir, **kwargs)


def export(
    state: dict[str, torch.Tensor],
    out_dir,
    package_dir,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dirs=(),
    eos_token_id: int | None = None,
    quantize_recipe: str | None = None,
) -> Path:
    """Write the model state dict STATE as a Hugging Face model directory OUT_DIR.

    Writes ``config.json`` (the package's recorded config, with ``dtype`` that of the weights),
    ``generation_config.json``, the weights (``model.safetensors``, or shards of at most
    MAX_SHARD_BYTES with an index), the tokenizer files found first in TOKENIZER_DIRS and, for a
    custom architecture, the modelling code ``config.json``'s ``auto_map`` names. A tied weight
    is written once, under its source name. With QUANTIZE_RECIPE, the projection weights are
    quantized with torchao (:mod:`.quantize`; standard architectures only). The directory is
    written beside OUT_DIR, then renamed into place (an earlier export there is replaced).
    """
    package_dir = Path(package_dir)
    spec = read_export_spec(package_dir)
    config = dict(spec["config"])
    generation = dict(spec["generation_config"])
    if eos_token_id is not None and config.get("eos_token_id") is None:
        config["eos_token_id"] = generation["eos_token_id"] = eos_token_id
    tensors = {k: v for k, v in state.items() if k not in spec["tied"] and not _IGNORED.search(k)}
    for target, source in spec["tied"].items():
        if target in state and source in state and not torch.equal(state[target], state[source]):
            raise RunError(f"{target} should be tied to {source} but differs from it", path=out_dir)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    if spec["remote_code"]:
        tensors = {REMOTE_PREFIX + k: v for k, v in tensors.items()}
    metadata = {"format": "pt"}
    if quantize_recipe is not None:
        if spec["remote_code"]:
            raise RunError("--quantize: only a standard transformers architecture can be quantized", path=out_dir)
        tensors, quantized_metadata, config["quantization_config"] = quantize.quantize(tensors, quantize_recipe)
        metadata.update(quantized_metadata)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    safetensors.save_sharded(tensors, tmp, max_shard_bytes, metadata=metadata)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", generation)
    for directory in tokenizer_dirs:
        found = [n for n in TOKENIZER_FILES if directory is not None and (Path(directory) / n).is_file()]
        for name in found:
            shutil.copyfile(Path(directory) / name, tmp / name)
        if found:
            break
    if spec["remote_code"]:
        _write_remote_code(tmp, package_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- custom architectures: modelling code for trust_remote_code ------------------------------

_MODELING = '''"""Hugging Face wrapper of a model generated by fgc; load it with trust_remote_code=True.

fgc_model.py is the package's model.py, and fgc_kernels.py the torch kernels it calls; the
parameters live under `fgc_model.` (the model built by fgc_model.build_model).
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .fgc_model import build_model


class FgcConfig(PretrainedConfig):
    model_type = "fgc"


class FgcForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FgcConfig
    base_model_prefix = "fgc_model"

    def __init__(self, config):
        super().__init__(config)
        # weights come from the checkpoint, not from the directory the package was built from
        fresh = {"weights_dir": None} if "weights_dir" in inspect.signature(build_model).parameters else {}
        self.fgc_model = build_model(**fresh)
        self._tied_weights_keys = dict(getattr(config, "fgc_tied_weights", None) or {}) or None
        self.post_init()

    def _init_weights(self, module):
        # build_model initialised every weight, and loading overwrites them. But transformers
        # builds the model without values and fills in only what the files hold: a module whose
        # state is only non-persistent buffers (the rotary tables) recomputes them here.
        if not list(module.parameters(recurse=False)) and getattr(module, "_non_persistent_buffers_set", None):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.fgc_model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)
'''

_RELATIVE_IMPORT = re.compile(r"^from \.[\w.]* import (\([^)]*\)|[^\n]*)\n", re.MULTILINE)
_FUTURE = re.compile(r"^from __future__ import [^\n]*\n", re.MULTILINE)


def _write_remote_code(out: Path, package_dir: Path) -> None:
    """modeling_fgc.py, fgc_model.py (model.py importing fgc_kernels) and fgc_kernels.py (the
    package's fgc_runtime/kernels modules in one file: remote code may import only flat files)."""
    (out / "modeling_fgc.py").write_text(_MODELING, encoding="utf-8")
    model_src = (package_dir / "model.py").read_text(encoding="utf-8")
    model_src = re.sub(r"^from fgc_runtime\.kernels import", "from .fgc_kernels import", model_src, flags=re.M)
    # fgc_kernels.py carries the torch twins only (remote code is flat files): a model built to run
    # the Triton kernels (-D kernel_impl=triton) runs the twins there
    model_src = model_src.replace('kernel_impl="triton"', 'kernel_impl="auto"')
    if re.search(r"^\s*(from|import) fgc_runtime", model_src, flags=re.M):
        raise RunError("model.py uses fgc_runtime beyond its kernels: cannot write remote code for it", path=out)
    (out / "fgc_model.py").write_text(model_src, encoding="utf-8")
    kernels_dir = package_dir / "fgc_runtime" / "kernels"
    modules = sorted(p for p in kernels_dir.glob("*.py") if p.name != "__init__.py")
    parts = ['"""The kernels of fgc_runtime, in one module (written by fgc_runtime.hf)."""\n\nfrom __future__ import annotations\n']
    for path in sorted(modules, key=lambda p: (not p.name.startswith("_"), p.name)):
        text = _FUTURE.sub("", _RELATIVE_IMPORT.sub("", path.read_text(encoding="utf-8")))
        parts.append(f"\n# ---- fgc_runtime/kernels/{path.name}\n{text}")
    (out / "fgc_kernels.py").write_text("".join(parts), encoding="utf-8")


def data_eos_id(data_dir) -> int | None:
    """The ``eos_id`` of a token-shard directory's ``meta.json``, or None without a readable one."""
    try:
        return int(json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))["eos_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
