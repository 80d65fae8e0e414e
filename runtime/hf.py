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
import tempfile
from pathlib import Path

import torch

from . import quantize, safetensors
from .checkpoint import chosen_checkpoint, load_file, nonfinite_tensor
from .errors import RunError

EXPORT_SPEC = "hf_config.json"  # in the package, beside train.py
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size is of this order
# chat_template.jinja: where recent transformers versions save a tokenizer's chat template
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
EXPORT_MARKER = "fgc-export.json"  # written into every export: what it wrote
EXPORT_FORMAT = "fgc-hf-export"
REMOTE_PREFIX = "fgc_model."  # parameter names of a custom architecture inside its wrapper
# Non-persistent buffers that older transformers checkpoints still carry: never weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---- tensor names ----------------------------------------------------------------------------


class TensorMap:
    """fgc's tensor names against a Hugging Face checkpoint's, from a family's rules (fgc's
    ``fgc.families.TensorRule``, as JSON data: ``{"hf", "fgc", "dim", "transpose", "groups"}``).

    A rule's names may hold ``{i}``, a layer index. With one fgc name, a rule renames; with
    several, the checkpoint's tensor is their concatenation along ``dim`` (GPT-2's ``c_attn``:
    q, k and v); ``transpose``: the checkpoint stores the transpose of fgc's 2-D tensor.
    ``groups`` G (1 when absent): the checkpoint's tensor is G groups one after another along
    ``dim``, each the concatenation of every fgc tensor's next 1/G part (GPT-NeoX's
    ``query_key_value``: q, k and v head by head). A rule without fgc names names a tensor of the
    checkpoint that is not a weight (a buffer older checkpoints saved): loading ignores it. Several
    rules may cover the same fgc name: loading takes the first whose tensor the files hold,
    exporting the first. A name no rule matches is the same on both sides.

    An experts rule (``fgc.families.ExpertsRule``: ``{"experts": [hf names], "fgc": [name]}``)
    says fgc's 3-D tensor stacks one slice per expert along dim 0, and the checkpoint holds each
    expert's slice as the concatenation, along its first dim, of the tensors the hf names give
    for that expert (``{e}`` in them: its index).
    """

    def __init__(self, rules=()):
        self.rules = []
        self.ignored = []
        self.experts = []  # (experts rule, its fgc name's pattern)
        for rule in rules:
            if "experts" in rule:
                self.experts.append((rule, re.compile(_name_pattern(rule["fgc"][0]))))
                continue
            if not rule["fgc"]:
                self.ignored.append(re.compile(_name_pattern(rule["hf"])))
                continue
            patterns = [re.compile(_name_pattern(p)) for p in rule["fgc"]]
            self.rules.append((rule, patterns))

    def ignores(self, hf_name: str) -> bool:
        """Whether HF_NAME is a tensor of the checkpoint that a rule says is not a weight."""
        return any(pattern.match(hf_name) for pattern in self.ignored)

    def match(self, name: str, available=None):
        """``(hf name, fgc names of the group, index of NAME in it, dim, transpose, groups)`` of
        the rule that covers fgc's NAME: the first such rule, or with AVAILABLE (the checkpoint's
        tensor names) the first whose tensor is there; None when no rule does (the name is the
        same)."""
        first = None
        for rule, patterns in self.rules:
            for k, pattern in enumerate(patterns):
                found = pattern.match(name)
                if found:
                    fill = found.groupdict()
                    group = [p.format(**fill) for p in rule["fgc"]]
                    hf_name = rule["hf"].format(**fill)
                    result = (hf_name, group, k, rule["dim"], rule["transpose"], rule.get("groups", 1))
                    if available is None or hf_name in available:
                        return result
                    first = first or result
        return first

    def experts_of(self, name: str, num_experts: int) -> list[list[str]] | None:
        """For fgc's 3-D tensor NAME of NUM_EXPERTS experts that an experts rule covers, the
        checkpoint's tensor names of each expert, in order; None when no experts rule does."""
        for rule, pattern in self.experts:
            found = pattern.match(name)
            if found:
                fill = found.groupdict()
                return [[h.format(e=e, **fill) for h in rule["experts"]] for e in range(num_experts)]
        return None

    def to_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """TENSORS (fgc's names) under the checkpoint's names: a group of a rule concatenated (and
        transposed) into its one tensor once all of it is there; a 3-D tensor of experts cut into
        its experts' tensors."""
        out = {}
        for name, value in tensors.items():
            per_expert = self.experts_of(name, value.shape[0]) if value.dim() == 3 else None
            if per_expert is not None:
                for e, hf_names in enumerate(per_expert):
                    for hf_name, part in zip(hf_names, value[e].chunk(len(hf_names), dim=0)):
                        out[hf_name] = part.clone()  # a tensor of its own, not a view of the stack
                continue
            found = self.match(name)
            if found is None:
                out[name] = value
                continue
            hf_name, group, _, dim, transpose, groups = found
            if hf_name in out or not all(g in tensors for g in group):
                continue
            if len(group) == 1:
                joined = value
            elif groups == 1:
                joined = torch.cat([tensors[g] for g in group], dim=dim)
            else:
                # each tensor as (G, its share) along dim, the shares joined group by group
                joined = torch.cat([tensors[g].unflatten(dim, (groups, -1)) for g in group], dim=dim + 1)
                joined = joined.flatten(dim, dim + 1)
            out[hf_name] = joined.t().contiguous() if transpose else joined
        return out


def _name_pattern(name: str) -> str:
    """A regex matching NAME, its ``{i}`` any layer index (the group ``i``)."""
    return re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"


# ---- import ---------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, model_dir, tensor_rules=()) -> None:
    """Copy the safetensors weights of the Hugging Face model directory MODEL_DIR into MODEL.

    Every parameter and persistent buffer of the model must be there with its shape, and every
    tensor there must belong to the model (a RunError naming the file otherwise; checked from
    the files' headers). A head tied to the embedding may be absent from the files, as
    transformers writes it. Values are cast to the model's dtype. TENSOR_RULES (the family's,
    see :class:`TensorMap`) say where a tensor's name or layout differs from fgc's.

    Only what this process holds is read: a tensor still on the meta device (another pipeline
    stage's) is skipped, and a DTensor (an FSDP2 or tensor-parallel parameter) gets its shard.

    A model whose vocabulary is larger than the checkpoint's (built with the vocabulary of its
    data: see :func:`vocab_tensors`) grows: the embedding (and an untied head) takes the file's
    rows first, and each new row is the mean of them; one line says so. Any other shape that
    differs is a RunError.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RunError("no such Hugging Face model directory (see --weights)", path=model_dir)
    where = model_dir / (
        safetensors.INDEX_FILE if (model_dir / safetensors.INDEX_FILE).is_file() else safetensors.SINGLE_FILE
    )
    names = TensorMap(tensor_rules)
    files = {
        k: v for k, v in safetensors.index_dir(model_dir).items() if not _IGNORED.search(k) and not names.ignores(k)
    }
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(model)  # name -> the first name of the same parameter
    vocab = vocab_tensors(model)
    grown = {}  # the model's name -> the rows the files hold of it (fewer than the model's)
    sources = {}  # the model's name -> (the name in the files, its part: transpose, dim, start, size, groups)
    for name, target in state.items():
        per_expert = names.experts_of(name, target.shape[0]) if target.dim() == 3 and name not in files else None
        if per_expert is not None:  # a 3-D tensor of experts the files hold expert by expert
            _check_experts(name, target, per_expert, files, where)
            sources[name] = (per_expert, "experts")
            continue
        found = names.match(name, files)
        if found is None:
            source = name if name in files else aliases.get(name)
            part = None
        else:
            source, group, k, dim, transpose, groups = found
            sizes = [state[g].shape[dim] if g in state else None for g in group]
            part = (transpose, dim, sum(sizes[:k]), sizes[k], groups) if None not in sizes else None
        if source not in files and aliases.get(name) in sources:
            # a tied weight (the head) that the files hold under its first name only
            sources[name] = sources[aliases[name]]
            if aliases[name] in grown:
                grown[name] = grown[aliases[name]]
            continue
        if source not in files:
            raise RunError(f"tensor {name!r} of the model is missing", path=where)
        shape = list(files[source].entries[source]["shape"])
        want = list(target.shape)
        if part is not None:
            transpose, dim, _, _, groups = part
            shape = shape[::-1] if transpose else shape
            want[dim] = sum(state[g].shape[dim] for g in group)
            uneven = next((g for g in group if state[g].shape[dim] % groups), None)
            if uneven is not None:
                raise RunError(f"tensor {uneven!r} of the model does not split into {groups} groups", path=where)
        if shape != want and name in vocab and _fewer_rows(shape, want, part):
            grown[name] = shape[0]
            if part is not None:  # a renamed tensor (one fgc name): the file's whole tensor
                part = (part[0], part[1], 0, shape[part[1]], part[4])
        elif shape != want:
            raise RunError(f"tensor {source!r} has shape {shape}, the model's is {want}", path=where)
        sources[name] = (source, part)
    used = {n for source, part in sources.values() for n in (sum(source, []) if part == "experts" else [source])}
    extra = sorted(set(files) - used)
    if extra:
        raise RunError(f"tensor {extra[0]!r} is not a parameter of the model", path=where)
    with torch.no_grad():
        for name, target in state.items():
            if target.is_meta:
                continue
            source, part = sources[name]
            if part == "experts":  # each expert's tensors concatenated, the experts stacked
                values = torch.stack([torch.cat([files[n].get(n) for n in hf_names]) for hf_names in source])
                part = None
            else:
                values = files[source].get(source)
            if part is not None:
                transpose, dim, start, size, groups = part
                values = values.t() if transpose else values
                if groups == 1:
                    values = values.narrow(dim, start, size)
                else:  # this tensor's share of each of the G groups
                    values = values.unflatten(dim, (groups, -1))
                    values = values.narrow(dim + 1, start // groups, size // groups).flatten(dim, dim + 1)
            if name in grown:
                values = grow_rows(values, target.shape[0])
            if hasattr(target, "device_mesh"):  # a DTensor: this rank's shard
                from torch.distributed.tensor import distribute_tensor

                values = distribute_tensor(
                    values.to(device=target.device, dtype=target.dtype),
                    target.device_mesh,
                    target.placements,
                    src_data_rank=None,
                )
            target.copy_(values)
    if grown:
        _say_grown(where, grown, state, aliases)


def vocab_tensors(model: torch.nn.Module) -> set[str]:
    """The state-dict names of MODEL's tensors whose rows are its vocabulary (``vocab_size``):
    the parameters of each ``nn.Embedding`` with that many rows and each ``nn.Linear`` with that
    many outputs outside the decoder layers (the token embedding and the LM head of every family;
    a position embedding has ``max_position_embeddings`` rows). Empty for a model without an int
    ``vocab_size``."""
    vocab = getattr(model, "vocab_size", None)
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return set()
    layers = getattr(model, "decoder_layers", None)
    inside = {id(m) for m in layers().modules()} if callable(layers) else set()
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        if isinstance(module, torch.nn.Embedding):
            rows = module.num_embeddings
        elif isinstance(module, torch.nn.Linear):
            rows = module.out_features
        else:
            continue
        if rows == vocab:
            names.update(f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters(recurse=False))
    return names


def _fewer_rows(shape: list, want: list, part) -> bool:
    """Whether a file's tensor of SHAPE is the model's of shape WANT with fewer rows: the same
    other sizes, not cut from a concatenation (PART: a rule that renames only, or none)."""
    if part is not None and (part[1] != 0 or part[4] != 1 or part[2] != 0 or part[3] != want[0]):
        return False
    return len(shape) == len(want) and 0 < shape[0] < want[0] and shape[1:] == want[1:]


def grow_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    """VALUES with rows added up to ROWS, each the mean of VALUES' rows (computed in fp32), so a
    new token starts where the old ones are on average and changes no old token's logits much."""
    mean = values.float().mean(dim=0, keepdim=True).to(values.dtype)
    return torch.cat([values, mean.expand(rows - values.shape[0], *values.shape[1:])])


def _say_grown(where: Path, grown: dict, state: dict, aliases: dict) -> None:
    """The line that says the vocabulary grew (rank 0 only): from how many rows to how many, and
    which tensors (a tied head once, as its embedding)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    names = [n for n in grown if n not in aliases]
    old = min(grown.values())
    new = state[names[0]].shape[0]
    print(
        f"{where}: the vocabulary grew from {old} to {new} tokens: {', '.join(names)} "
        f"got {new - old} new rows, each the mean of the old rows",
        flush=True,
    )


def _check_experts(name: str, target: torch.Tensor, per_expert: list[list[str]], files: dict, where) -> None:
    """A RunError unless the files hold every expert's tensors of fgc's 3-D tensor NAME, each
    with its share of the expert's slice."""
    parts = len(per_expert[0])
    if target.shape[1] % parts:
        raise RunError(f"tensor {name!r} of the model does not split into {parts} tensors per expert", path=where)
    want = [target.shape[1] // parts, *target.shape[2:]]
    for hf_names in per_expert:
        for hf_name in hf_names:
            if hf_name not in files:
                raise RunError(f"tensor {hf_name!r} of the model (of {name!r}) is missing", path=where)
            shape = list(files[hf_name].entries[hf_name]["shape"])
            if shape != want:
                raise RunError(f"tensor {hf_name!r} has shape {shape}, the model's is {want}", path=where)


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
    """The checkpoint ``--export-hf`` writes: ``--checkpoint PATH`` (an error unless it verifies),
    else the one ``--resume auto`` would take: the newest in OUTPUT_DIR that verifies."""
    return chosen_checkpoint(arg, output_dir, purpose="export", doing="exporting")


def export_checkpoint(checkpoint_dir, out_dir, package_dir, **kwargs) -> Path:
    """Write the model of an fgc checkpoint as a Hugging Face model directory (see :func:`export`)."""
    path = Path(checkpoint_dir) / "model.pt"
    if not path.is_file():
        raise RunError("checkpoint file model.pt is missing", path=path)
    state = load_file(path)
    return export(state, out_dir, package_dir, **kwargs)


def read_export_marker(out_dir) -> list[str] | None:
    """The files the earlier export in OUT_DIR wrote, from its ``fgc-export.json``; None when
    there is no valid marker (no file, not JSON, another format, or a name with a directory part:
    a marker never makes an export delete anything outside its own directory)."""
    try:
        marker = json.loads((Path(out_dir) / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, list):
        return None
    for name in files:
        if not isinstance(name, str) or name in ("", ".", "..", EXPORT_MARKER) or "/" in name or "\\" in name:
            return None
    return files


def check_export_dir(out_dir, hint: str | None = None) -> None:
    """A RunError naming OUT_DIR unless an export may write there: a missing directory, an empty
    one, or an earlier export (its ``fgc-export.json``). HINT ends the message (what to do).
    Nothing is written."""
    _export_target(Path(out_dir), hint)


def _export_target(out_dir: Path, hint: str | None = None) -> tuple[list[str], list[str]] | None:
    """None for a missing OUT_DIR; else the files of the earlier export there (possibly none)
    and the other entries (the user's, kept). A RunError for anything an export may not replace."""
    hint = hint or "choose an empty or new directory"
    if out_dir.is_symlink() and not out_dir.exists():
        raise RunError(f"a symbolic link to nothing: an export cannot be written here; {hint}", path=out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise RunError(f"not a directory: an export cannot be written here; {hint}", path=out_dir)
    try:
        entries = sorted(p.name for p in out_dir.iterdir())
    except OSError as err:
        raise RunError(f"cannot read the directory ({err.strerror})", path=out_dir) from None
    if not entries:
        return [], []
    previous = read_export_marker(out_dir)
    if previous is None:
        what = "its fgc-export.json is not valid" if EXPORT_MARKER in entries else "it has no fgc-export.json"
        raise RunError(
            f"not replacing this directory: it is not empty and {what}, so it is not an earlier export "
            f"(an export replaces only those); {hint}",
            path=out_dir,
        )
    # only regular files the marker lists are the export's: anything else there is the user's
    ours = [n for n in previous if (out_dir / n).is_file() and not (out_dir / n).is_symlink()]
    user = [n for n in entries if n != EXPORT_MARKER and n not in ours]
    return ours, user


def export(
    state: dict[str, torch.Tensor],
    out_dir,
    package_dir,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dirs=(),
    eos_token_id: int | list[int] | None = None,
    quantize_recipe: str | None = None,
) -> Path:
    """Write the model state dict STATE as a Hugging Face model directory OUT_DIR.

    Writes ``config.json`` (the package's recorded config, with ``dtype`` that of the weights),
    ``generation_config.json``, the weights (``model.safetensors``, or shards of at most
    MAX_SHARD_BYTES with an index), the tokenizer files found first in TOKENIZER_DIRS (its chat
    template included) and, for a custom architecture, the modelling code ``config.json``'s
    ``auto_map`` names. EOS_TOKEN_ID (:func:`data_eos_id`): an id is the ``eos_token_id`` of both
    configs when the model's config has none; a list (the data's ``eos_ids``: every id that ends a
    turn or a text) is theirs whatever the model had, so ``generate`` stops at the end of a turn. A tied weight
    is written once, under its source name. With QUANTIZE_RECIPE, the projection weights are
    quantized with torchao (:mod:`.quantize`; standard architectures only).

    ``fgc-export.json`` records the files written. OUT_DIR may be missing (the export is written
    beside it, then renamed into place), empty, or an earlier export: then only the files its
    marker lists are replaced or removed, and files the user added are kept (one whose name the
    new export writes is an error). Anything else is a RunError, and nothing is touched. So are
    weights with a nan or infinite value.
    """
    out_dir = Path(out_dir)
    problem = nonfinite_tensor(state)
    if problem is not None:
        raise RunError(f"not exporting weights that are not finite: {problem}", path=out_dir)
    target = _export_target(out_dir)
    package_dir = Path(package_dir)
    spec = read_export_spec(package_dir)
    config = dict(spec["config"])
    generation = dict(spec["generation_config"])
    if isinstance(eos_token_id, list):
        config["eos_token_id"] = generation["eos_token_id"] = list(eos_token_id)
    elif eos_token_id is not None and config.get("eos_token_id") is None:
        config["eos_token_id"] = generation["eos_token_id"] = eos_token_id
    tensors = {k: v for k, v in state.items() if k not in spec["tied"] and not _IGNORED.search(k)}
    for target_name, source in spec["tied"].items():
        if target_name in state and source in state and not torch.equal(state[target_name], state[source]):
            raise RunError(f"{target_name} should be tied to {source} but differs from it", path=out_dir)
    # the family's own names and layouts (fused tensors, transposed weights), where they differ
    tensors = TensorMap(spec.get("tensors", ())).to_hf(tensors)
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

    # Staged in a directory of our own (beside OUT_DIR when it is missing, else inside it, so the
    # files move by rename); removed whatever happens.
    if target is None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fgc-export-", dir=out_dir.parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix=".fgc-export-", dir=out_dir))
    try:
        safetensors.save_sharded(tensors, staging, max_shard_bytes, metadata=metadata)
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", generation)
        for directory in tokenizer_dirs:
            found = [n for n in TOKENIZER_FILES if directory is not None and (Path(directory) / n).is_file()]
            for name in found:
                shutil.copyfile(Path(directory) / name, staging / name)
            if found:
                break
        if spec["remote_code"]:
            _write_remote_code(staging, package_dir)
        written = sorted(p.name for p in staging.iterdir())
        if target is None:
            _write_marker(staging, written, staging)
            os.replace(staging, out_dir)
        else:
            _replace_export(out_dir, staging, written, *target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _write_marker(directory: Path, files: list[str], staging: Path) -> None:
    """``fgc-export.json`` in DIRECTORY, replaced atomically (written in STAGING, the export's own
    directory, then renamed): an export wrote FILES there."""
    tmp = staging / f".{EXPORT_MARKER}.tmp"
    _write_json(tmp, {"format": EXPORT_FORMAT, "version": 1, "files": sorted(files)})
    os.replace(tmp, directory / EXPORT_MARKER)


def _replace_export(out_dir: Path, staging: Path, written: list[str], old: list[str], user: list[str]) -> None:
    """Move the export staged in STAGING (inside OUT_DIR) into OUT_DIR, in place of the earlier
    export's files OLD; the user's entries USER stay. The marker first lists both exports' files,
    so an interruption leaves a directory the next export still recognises and cleans."""
    clash = sorted(set(user) & set(written))
    if clash:
        raise RunError(
            f"{clash[0]} was added to this export by hand, and the new export writes a file of that name: "
            "move it away first",
            path=out_dir,
        )
    _write_marker(out_dir, sorted(set(old) | set(written)), staging)
    for name in sorted(set(old) - set(written)):
        (out_dir / name).unlink(missing_ok=True)
    for name in written:
        os.replace(staging / name, out_dir / name)
    _write_marker(out_dir, written, staging)


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


def data_eos_id(data_dir) -> int | list[int] | None:
    """What ends a text of a token-shard directory, for an export's ``eos_token_id``: the list of
    its ``meta.json``'s ``eos_ids`` when it has them (chat shards: every id that ends a turn or a
    text), else its ``eos_id``; None without a readable one."""
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
        ids = meta.get("eos_ids")
        if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return list(dict.fromkeys(ids))  # in order, each once
        return int(meta["eos_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
