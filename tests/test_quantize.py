"""`train.py --export-hf DIR --quantize RECIPE`: torchao-quantized Hugging Face exports that
transformers loads back (on the CPU), and the flag's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_hf import IDS, build, logits, save_tiny, train

transformers = pytest.importorskip("transformers")

from fgc_runtime import quantize  # noqa: E402

# recipe -> (the loaded weights' torchao class, the largest logit difference allowed)
RECIPES = {
    "int8-weight-only": ("Int8Tensor", 0.02),
    "int4-weight-only": ("IntxUnpackedToInt8Tensor", 0.25),
    "int8-dynamic-int4-weight": ("IntxUnpackedToInt8Tensor", 0.25),
}


def test_the_recipes_are_the_flag_choices():
    assert set(RECIPES) == set(quantize.RECIPES)


def test_only_projections_whose_input_size_the_group_size_divides_are_quantized():
    w = torch.zeros(8, 2 * quantize.GROUP_SIZE)
    assert quantize.quantizable("model.layers.0.self_attn.q_proj.weight", w)
    assert quantize.quantizable("model.layers.3.mlp.down_proj.weight", w)
    assert not quantize.quantizable("model.layers.0.mlp.down_proj.weight", torch.zeros(8, quantize.GROUP_SIZE + 1))
    assert not quantize.quantizable("model.embed_tokens.weight", w)
    assert not quantize.quantizable("lm_head.weight", w)
    assert not quantize.quantizable("model.layers.0.input_layernorm.weight", torch.zeros(64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A package fine-tuning a tiny tied Llama, trained one step at learning rate 0."""
    tmp = tmp_path_factory.mktemp("quantize")
    src = save_tiny("llama", tmp / "hf", tie=True)
    pkg = build(tmp, src, "-D", "lr=0")
    proc = train(pkg, "--max-steps", 1, "--output-dir", tmp / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, src, pkg


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_quantized_export_loads_back_for_inference(trained, recipe):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    from torchao.utils import TorchAOBaseTensor

    tmp, src, pkg = trained
    out = tmp / f"exp-{recipe}"
    proc = train(pkg, "--output-dir", tmp / "run", "--export-hf", out, "--quantize", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"

    original, expected = logits(src, IDS)
    model, got = logits(out, IDS)
    cls, tolerance = RECIPES[recipe]
    projections = [m.weight for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(projections) == 2 * 7
    assert all(type(w).__name__ == cls and isinstance(w, TorchAOBaseTensor) for w in projections)
    # the embedding (and the head tied to it) stay full precision, and tied
    assert type(model.lm_head.weight) is torch.nn.Parameter
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(got, expected)  # quantization happened
    assert (got - expected).abs().max().item() < tolerance

    # the same recipe applied by torchao to the original transformers model: the same logits
    quantize_(original, quantize.torchao_config(recipe), filter_fn=lambda m, name: name.endswith("_proj"))
    with torch.no_grad():
        assert torch.equal(original(IDS).logits, got)


@pytest.mark.slow
def test_quantize_errors(trained, tmp_path):
    tmp, _, pkg = trained
    requirements = (pkg / "requirements.txt").read_text().splitlines()
    assert "torchao" not in requirements  # an optional extra, named in a comment
    assert any(line.startswith("# optional: torchao (") for line in requirements)
    proc = train(pkg, "--output-dir", tmp / "run", "--quantize", "int8-weight-only")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --quantize applies only to --export-hf DIR"

    proc = train(pkg, "--output-dir", tmp / "run", "--export-hf", tmp_path / "exp", "--quantize", "int3")
    assert proc.returncode == 2
    assert "error: argument --quantize: invalid choice: 'int3'" in proc.stderr.splitlines()[-1]

    # without torchao (an importable package that fails to import stands in for it)
    (tmp_path / "fake" / "torchao").mkdir(parents=True)
    (tmp_path / "fake" / "torchao" / "__init__.py").write_text("raise ImportError('no torchao')\n")
    proc = subprocess.run(
        [sys.executable, str(pkg / "train.py"), "--output-dir", str(tmp / "run")]
        + ["--export-hf", str(tmp_path / "exp"), "--quantize", "int4-weight-only"],
        capture_output=True,
        text=True,
        cwd=pkg.parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --quantize needs torchao, which is not installed: pip install torchao"
    assert not (tmp_path / "exp").exists()
