"""torchao weight quantization of a Hugging Face export (``--export-hf DIR --quantize RECIPE``).

torchao is an optional extra of the package: it is imported here, inside the functions, only
when ``--quantize`` is given. The quantized weights are torchao tensor subclasses, written the
way transformers' torchao integration reads them back: each one flattened into its plain parts
(``..._weight_qdata``, ``..._weight_scale``, ...) in the safetensors files, described in their
metadata (torchao's ``flatten_tensor_state_dict``), and config.json's ``quantization_config``
naming torchao and the torchao config (``TorchAoConfig.to_dict()``'s layout). Then
``AutoModelForCausalLM.from_pretrained(DIR)`` rebuilds the quantized model (torchao installed).

Quantized: the weights of the attention and MLP projections (``*_proj.weight``) whose input
size is a multiple of :data:`GROUP_SIZE`. The embedding and the LM head stay as they are
(transformers leaves the output embedding unquantized too). All three recipes run on the CPU:

- ``int8-weight-only``: int8 weights, one scale per output row (``Int8WeightOnlyConfig``);
- ``int4-weight-only``: int4 weights, one scale per group of GROUP_SIZE inputs
  (``IntxWeightOnlyConfig(weight_dtype=torch.int4)``; the values are stored one per byte);
- ``int8-dynamic-int4-weight``: the int4 weights above, and activations quantized to int8 per
  token at run time (``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)``).
"""

from __future__ import annotations

import re

import torch

from .errors import RunError

RECIPES = ("int8-weight-only", "int4-weight-only", "int8-dynamic-int4-weight")
GROUP_SIZE = 32  # inputs per int4 scale
# The linear layers of a standard (Llama-family) architecture; nothing else is quantized.
_LINEAR = re.compile(r"(^|\.)(q|k|v|o|gate|up|down)_proj\.weight$")


def require_torchao() -> None:
    """A RunError unless torchao can be imported."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise RunError("--quantize needs torchao, which is not installed: pip install torchao") from None


def torchao_config(recipe: str):
    """The torchao config object of RECIPE (one of :data:`RECIPES`)."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    if recipe == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if recipe == "int4-weight-only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP_SIZE))
    if recipe == "int8-dynamic-int4-weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))
    raise RunError(f"--quantize: unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Whether the weight NAME is quantized: a projection whose input size GROUP_SIZE divides."""
    return bool(_LINEAR.search(name)) and tensor.dim() == 2 and tensor.shape[1] % GROUP_SIZE == 0


def quantize(tensors: dict[str, torch.Tensor], recipe: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Quantize the projection weights of TENSORS (a state dict in transformers' names) by RECIPE.

    Returns the tensors to write (the quantized ones flattened into their parts), the
    safetensors metadata that describes them, and config.json's ``quantization_config``.
    """
    require_torchao()
    from torchao.core.config import config_to_dict
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import quantize_

    config = torchao_config(recipe)
    out = {}
    for name, tensor in tensors.items():
        if quantizable(name, tensor):
            # quantize_ works on modules: a Linear holding the weight, quantized in place
            linear = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
            linear.weight = torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
            quantize_(linear, config)
            out[name] = linear.weight.detach()
        else:
            out[name] = tensor
    flat, metadata = flatten_tensor_state_dict(out)
    quantization_config = {
        "quant_method": "torchao",
        "quant_type": {"default": config_to_dict(config)},
        "modules_to_not_convert": None,  # transformers' default: the LM head and tied weights
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }
    return flat, metadata, quantization_config
