"""The family registry (fgc/families/): one folder per family, found by name everywhere.

What a family's spec decides at the Hugging Face boundary: which config.json fields its template
reads, which are fixed, which transformers' model does not read (ignored with a note), and how
tensor names map in both directions (fused and transposed tensors included).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen3Config

from conftest import REPO, run_fgc
from fgc.families import BY_MODEL_TYPE, FAMILIES, FamilySpec, NAMES, TensorRule
from fgc.families.base import LLAMA_KNOBS
from fgc.frontend.templates import FgcLoader, LIBRARY_DIR, library_name
from fgc_runtime import safetensors
from fgc_runtime.hf import TensorMap, load_weights

FINETUNE = "examples/hf_finetune/finetune.yaml"


def test_every_registered_family_is_a_folder_with_its_spec_template_and_package():
    assert tuple(FAMILIES) == NAMES
    for name, spec in FAMILIES.items():
        assert spec.name == name and spec.folder.name == name
        assert spec.template.is_file()
        assert BY_MODEL_TYPE[spec.model_type] is spec


def test_setup_installs_every_family_folder_as_a_package(tmp_path):
    """setup.py finds the family folders itself: adding one takes no line of packaging."""
    proc = subprocess.run(
        [sys.executable, "-c", "import runpy, setuptools; setuptools.setup = lambda **kw: print(kw['packages']); "
         "runpy.run_path('setup.py')"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    packages = ast.literal_eval(proc.stdout)
    assert {f"fgc.families.{name}" for name in NAMES} <= set(packages)
    assert {"fgc", "fgc.families", "fgc_runtime", "fgc_runtime.kernels", "fgc_lowering"} <= set(packages)
    # and only real packages: a folder without __init__.py (a stray cache) is not one
    for package in packages:
        root, *rest = package.split(".")
        folder = {"fgc_lowering": "lowering", "fgc_runtime": "runtime", "fgc_codegen_templates": "codegen_templates"}.get(root, root)
        assert (REPO / folder / Path(*rest) / "__init__.py").is_file(), package


def test_the_components_page_lists_every_registered_family_and_no_other():
    rows = re.findall(r"^\| (\w+) \| `lm/(\w+)\.yaml` \| `(\w+)`", (REPO / "docs" / "components.md").read_text(), re.M)
    assert sorted(name for name, _, _ in rows) == sorted(NAMES)
    for name, template, architecture in rows:
        assert template == name and architecture == FAMILIES[name].architecture


@pytest.mark.parametrize("name", NAMES)
def test_a_family_template_is_found_and_shown_by_its_library_name(name):
    loader = FgcLoader([LIBRARY_DIR])
    path = loader.find(f"lm/{name}.yaml")
    assert path == FAMILIES[name].template.resolve()
    assert library_name(path) == f"lm/{name}.yaml"
    assert library_name(LIBRARY_DIR / "lm" / "train.yaml") == "lm/train.yaml"
    assert library_name(REPO / "examples" / "tiny_llama" / "train.yaml") is None


def test_a_users_template_of_the_same_name_comes_first(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "llama.yaml").write_text("x: 1\n")
    assert FgcLoader([tmp_path, LIBRARY_DIR]).find("lm/llama.yaml") == (tmp_path / "lm" / "llama.yaml").resolve()


def _config_json(config) -> dict:
    return json.loads(config.to_json_string())


# metadata that real Llama-type checkpoints carry, which transformers' LlamaForCausalLM never reads
METADATA = {
    "is_llama_config": True,
    "rope_interleaved": False,
    "unsloth_version": "2024.9",
    "_attn_implementation_autoset": True,
    "auto_map": {"AutoModelForCausalLM": "modeling.Foo"},
    "attn_logit_softcapping": None,
}


def test_fields_transformers_does_not_read_are_ignored_with_a_note():
    config = {**_config_json(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)), **METADATA}
    problem, ignored = FAMILIES["llama"].classify(config)
    assert problem is None
    assert ignored == sorted(METADATA)


@pytest.mark.parametrize(
    "family, config_class, field, value, message",
    [
        ("llama", LlamaConfig, "hidden_act", "gelu", "hidden_act is 'gelu', but fgc's llama template supports only 'silu'"),
        ("llama", LlamaConfig, "pretraining_tp", 2, "pretraining_tp is 2, but fgc's llama template supports only 1"),
        ("mistral", MistralConfig, "attention_dropout", 0.1, "attention_dropout is 0.1, but fgc's mistral template supports only 0.0"),
        ("qwen3", Qwen3Config, "use_sliding_window", True, "use_sliding_window is True, but fgc's qwen3 template has no sliding-window layers"),
    ],
)
def test_a_field_that_changes_the_model_and_is_not_representable_is_an_error(family, config_class, field, value, message):
    config = {**_config_json(config_class(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2)), field: value}
    assert FAMILIES[family].classify(config) == (message, [])


def test_a_field_transformers_reads_that_the_spec_does_not_know_is_an_error():
    # a spec that forgot a knob: transformers' LlamaConfig has mlp_bias, so it may change the model
    spec = FamilySpec(
        name="llama", model_type="llama", architecture="LlamaForCausalLM", folder=FAMILIES["llama"].folder,
        knobs=LLAMA_KNOBS - {"mlp_bias"}, fixed=FAMILIES["llama"].fixed, export_fields=lambda model, source: None,
    )
    config = _config_json(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, mlp_bias=True))
    assert spec.classify(config) == ("field mlp_bias (True) is not one fgc's llama template knows", [])


def test_the_cli_notes_each_ignored_field_and_builds(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    config = {**_config_json(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4)), **METADATA}
    (src / "config.json").write_text(json.dumps(config))
    proc = run_fgc("check", FINETUNE, "-D", f"model_dir={src}", "-D", "data_dir=data")
    notes = [line for line in proc.stderr.splitlines() if ": note: " in line]
    assert len(notes) == len(METADATA), proc.stderr
    line = next(n for n in notes if "unsloth_version" in n)
    assert re.match(
        rf"examples/hf_finetune/finetune.yaml:12: note: {re.escape(str(src))}/config.json: field unsloth_version "
        r"\('2024.9'\) is ignored: transformers' LlamaForCausalLM does not read it, so it does not change the model$",
        line,
    ), line


# A GPT-2-like layout: q, k and v fused into one transposed tensor, and a renamed head.
RULES = [
    TensorRule("h.{i}.attn.c_attn.weight", ("layers.{i}.q.weight", "layers.{i}.k.weight", "layers.{i}.v.weight"),
               dim=0, transpose=True).to_data(),
    TensorRule("wte.weight", ("embed.weight",)).to_data(),
]


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(4, 2, bias=False)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.norm = torch.nn.LayerNorm(4)


def test_fused_and_transposed_tensors_map_both_ways(tmp_path):
    torch.manual_seed(0)
    source = _Model()
    hf = TensorMap(RULES).to_hf(dict(source.state_dict()))
    assert sorted(hf) == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight", "norm.bias", "norm.weight", "wte.weight"]
    layer = source.layers[1]
    assert torch.equal(hf["h.1.attn.c_attn.weight"], torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]).t())
    safetensors.save_file(hf, tmp_path / "model.safetensors")
    target = _Model()
    load_weights(target, tmp_path, RULES)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_a_fused_tensor_of_the_wrong_size_is_a_one_line_error(tmp_path):
    hf = TensorMap(RULES).to_hf(dict(_Model().state_dict()))
    hf["h.0.attn.c_attn.weight"] = torch.zeros(4, 9)
    safetensors.save_file(hf, tmp_path / "model.safetensors")
    with pytest.raises(Exception) as info:
        load_weights(_Model(), tmp_path, RULES)
    assert str(info.value) == (
        f"{tmp_path / 'model.safetensors'}: error: tensor 'h.0.attn.c_attn.weight' has shape [9, 4], the model's is [8, 4]"
    )


def _library_llama(attention=None, norm_offset=0.0, **model_options):
    """A Llama of the component library's parts (2 layers, hidden 32), ATTENTION options on every
    layer's attention."""
    import functools

    from fgc.components.attention import CausalSelfAttention
    from fgc.components.causal_lm import CausalLM
    from fgc.components.layers import PreNormDecoderLayer
    from fgc.components.mlp import SwiGLUMLP
    from fgc.components.norm import RMSNorm
    from fgc.components.rotary import RotaryEmbedding

    norm = functools.partial(RMSNorm, offset=norm_offset)
    layer = functools.partial(
        PreNormDecoderLayer,
        attention_factory=functools.partial(CausalSelfAttention, num_attention_heads=4, **(attention or {})),
        mlp_factory=functools.partial(SwiGLUMLP, intermediate_size=40),
        norm_factory=norm,
    )
    with torch.device("meta"):
        return CausalLM(vocab_size=50, hidden_size=32, num_hidden_layers=2, norm_factory=norm,
                        positions=RotaryEmbedding(8), layer_factory=layer, **model_options)


@pytest.mark.parametrize(
    "options",
    [
        {"attention": {"scaling": 0.3}},
        {"attention": {"attn_logit_softcapping": 50.0}},
        {"attention": {"rotary_dim": 4}},
        {"attention": {"attention_dropout": 0.1}},
        {"norm_offset": 1.0},
        {"embedding_multiplier": 2.0},
        {"logits_scaling": 4.0},
        {"final_logit_softcapping": 30.0},
    ],
    ids=lambda o: next(iter(o.get("attention", o))),
)
def test_a_library_llama_with_an_option_no_family_has_with_its_parts_is_not_exported_as_a_family(options):
    """Such a model exports as a custom architecture, never as a family whose class would compute
    something else (the Llama-style families once ignored these options); a family whose class
    has the option may claim it, with its value."""
    assert FAMILIES["llama"].export_fields(_library_llama(), None) is not None
    model = _library_llama(**options)
    for name, spec in FAMILIES.items():
        fields = spec.export_fields(model, None)
        if fields is not None and options.get("attention", {}).get("attention_dropout"):
            # a family whose class has the dropout (SmolLM3's, a Llama of optional no-rope
            # layers) may claim it, writing it
            assert fields["attention_dropout"] == 0.1, name
        else:
            assert fields is None, name
