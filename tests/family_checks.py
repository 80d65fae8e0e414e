"""Shared helpers of the family tests tests/test_family_qwen2.py, test_family_smollm3.py and
test_family_granite.py: a tiny random transformers model, the family template built with its
config.json fields, the logits of both, the fine-tune round trip and the trainer runs.

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import EXAMPLE, REPO, run_fgc
from fgc.build import build_package, compile_config
from fgc.families import FAMILIES

SEQ = 37
FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
VOCAB = 300  # the round trip's vocabulary: the byte tokenizer's ids fit


def hf_model(model_class, config):
    """A transformers model with every weight random (norm weights and biases too), in eval mode."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.rand(p.shape, generator=gen) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def hf_fields(config) -> dict:
    """What a config.json holds: the config's fields as JSON values."""
    return json.loads(config.to_json_string())


def build(tmp_path: Path, family: str, variables: dict | None = None, name: str = "pkg") -> Path:
    """The package of FAMILY's template with VARIABLES, built into TMP_PATH/NAME."""
    out = tmp_path / name
    build_package(
        compile_config(FAMILIES[family].template, variables={"data_dir": "data", **(variables or {})}), out, smoke=False
    )
    return out


def import_model(package: Path):
    """The package's model.py as a module."""
    spec = importlib.util.spec_from_file_location(f"model_{package.parent.name}_{package.name}", package / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ids(vocab: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    """Fixed random token ids."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))


def logits_pair(tmp_path, family, model_class, config, fields=None):
    """(transformers' logits, fgc's, fgc's model, the package) for CONFIG, fgc's model built from
    FIELDS (default: the config's own) with transformers' weights."""
    hf = hf_model(model_class, config)
    package = build(tmp_path, family, {"hf_fields": fields if fields is not None else hf_fields(config)})
    ours = import_model(package).build_model().eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids_BT = ids(config.vocab_size)
    with torch.no_grad():
        ref_BTV, out_BTV = hf(ids_BT).logits, ours(ids_BT)
    assert ref_BTV.abs().max() > 0.1  # not a vacuous comparison of near-zero logits
    return ref_BTV, out_BTV, ours, package


def logits(model) -> torch.Tensor:
    """MODEL's logits of the fixed ids."""
    with torch.no_grad():
        return model(ids(model.vocab_size))


def differs(model, ref_BTV) -> bool:
    """Whether MODEL's logits are far from REF_BTV (a feature turned off matters)."""
    return bool((logits(model) - ref_BTV).abs().max() > 1e-3)


def train(pkg: Path, *args, torchrun: bool = False, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run the package's train.py (on NPROC ranks with TORCHRUN)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if torchrun else [sys.executable]
    return subprocess.run(
        [*launcher, str(pkg / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=pkg.parent,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def logged_losses(run: Path) -> list[float]:
    """The training losses a run logged, in order."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def round_trip(tmp_path: Path, model_class, config, architecture: str, sharded: tuple = ()):
    """Save a tiny random model of CONFIG with transformers, import it with the fine-tune example,
    train one step at lr 0, export it (final/ and --export-hf): transformers' AutoModelForCausalLM
    loads each export as ARCHITECTURE and gives back the original logits exactly. Each entry of
    SHARDED (-D flags of a trainer on 2 ranks) builds the model on the meta device, loads its
    share, computes the one-process loss of the step and exports the original model too. Returns
    the exported config.json."""
    src = tmp_path / "hf"
    hf_model(model_class, config).save_pretrained(src)
    shards = tmp_path / "shards"
    run_fgc("data", EXAMPLE.parent / "corpus.txt", "-o", shards, check=True)

    def finetune(name: str, *flags) -> Path:
        pkg = tmp_path / name
        run_fgc("build", FINETUNE, "-o", pkg, "-D", f"model_dir={src}", "-D", f"data_dir={shards}", "-D", "seq_len=32",
                "-D", "batch_size=4", "-D", "lr=0", *flags, check=True)
        return pkg

    pkg = finetune("pkg")
    proc = train(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a line says where the weights came from
    assert f"loaded the pretrained weights of {src.resolve()}\n" in proc.stdout
    proc = train(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [tmp_path / "run" / "final", tmp_path / "exp"]
    reference = logged_losses(tmp_path / "run")
    for i, flags in enumerate(sharded):
        pkg = finetune(f"pkg{i}", *flags, "-D", "nproc=2")
        assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        if "tensor_degree=2" in flags:
            plan = json.loads((pkg / "manifest.json").read_text())["plan"]["tensor_parallel"]
            assert {"q_proj", "k_proj", "v_proj"} <= set(plan["colwise"]), plan
        proc = train(pkg, "--max-steps", 1, "--output-dir", tmp_path / f"run{i}", torchrun=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert logged_losses(tmp_path / f"run{i}") == pytest.approx(reference, rel=2e-5), flags
        outs.append(tmp_path / f"run{i}" / "final")
    ids_BT = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_BTV = AutoModelForCausalLM.from_pretrained(str(src)).eval()(ids_BT).logits
    exported = None
    for out in outs:
        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert type(model).__name__ == architecture
        with torch.no_grad():
            assert torch.equal(model(ids_BT).logits, expected_BTV), out
        exported = json.loads((out / "config.json").read_text())
    return exported


def train_example(tmp_path: Path, family: str, flags: list[str], torchrun: bool = True) -> dict:
    """Build examples/tiny_llama/train.yaml with -D family=FAMILY and FLAGS, train 4 steps (on 2
    ranks with TORCHRUN): the loss is finite, starts near log(vocab) and falls; the final/ export
    is of the family. Returns final/config.json."""
    pkg = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", pkg, "-D", f"family={family}", "-D", "max_steps=4", "-D", "log_every=1",
            "-D", "eval_every=0", "-D", "batch_size=4", "-D", "seq_len=64", *flags, check=True)
    train_py = (pkg / "train.py").read_text()
    if any(flag in ("trainer_type=fsdp2", "trainer_type=pipeline") for flag in flags):
        assert 'model = build_model(device="meta")' in train_py
    proc = train(pkg, "--output-dir", tmp_path / "run", torchrun=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(257), abs=0.5)  # a fresh model: near-uniform predictions
    assert losses[-1] < losses[0]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["model_type"] == FAMILIES[family].model_type
    assert config["architectures"] == [FAMILIES[family].architecture]
    return config



def exports_as_its_family(tmp_path: Path, family: str, variables: dict) -> dict:
    """Build FAMILY's template from scratch with VARIABLES: the package's hf_config.json names the
    family's class, and transformers' model of that config with fgc's weights (norm weights away
    from 1) computes fgc's logits. Returns the exported config.json fields."""
    package = build(tmp_path, family, variables)
    spec = json.loads((package / "hf_config.json").read_text())
    assert spec["remote_code"] is False
    assert spec["config"]["architectures"] == [FAMILIES[family].architecture], spec["config"]
    ours = import_model(package).build_model().eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    config = AutoConfig.for_model(**spec["config"])
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config).eval()
    assert type(hf).__name__ == FAMILIES[family].architecture
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids_BT = ids(ours.vocab_size, seq=23)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids_BT).logits, ours(ids_BT), atol=1e-5, rtol=0)
    return spec["config"]


def config_json_error(tmp_path: Path, fields: dict) -> str:
    """`fgc build` of the fine-tune example over a model folder whose config.json is FIELDS: the
    first line of its error (exit status 2, no traceback, no package written)."""
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(fields))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "pkg").exists()
    first = proc.stderr.splitlines()[0]
    assert first.startswith("examples/hf_finetune/finetune.yaml:12: error:"), first
    return first


def packed_documents_keep_apart(package: Path) -> None:
    """The package's model, given two packed documents, computes each one's logits as if alone."""
    model = import_model(package).build_model().eval()
    ids_BT = ids(model.vocab_size, batch=1, seq=12)
    document_ids_BT = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed_BTV = model(ids_BT, document_ids_BT)
        torch.testing.assert_close(packed_BTV[:, :5], model(ids_BT[:, :5]), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_BTV[:, 5:], model(ids_BT[:, 5:]), atol=1e-5, rtol=0)
        assert (packed_BTV[:, 5:] - model(ids_BT)[:, 5:]).abs().max() > 1e-3


def checkpointing_keeps_the_gradients(package: Path) -> None:
    """Full and selective activation checkpointing give the gradients of the plain model."""
    from fgc_runtime.parallel import apply_activation_checkpointing

    build_model = import_model(package).build_model
    for mode in ("full", "selective"):
        grads = []
        for checkpointed in (False, True):
            torch.manual_seed(0)
            model = build_model()
            if checkpointed:
                assert apply_activation_checkpointing(model, mode=mode) == len(list(model.decoder_layers()))
            model(ids(model.vocab_size, seq=9)).square().mean().backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=f"{mode} {name}")


def meta_build_gets_the_whole_models_values(package: Path) -> None:
    """What the FSDP2 and pipeline trainers do: build on the meta device, allocate, init_weights()
    gives the values of the model built whole, and its logits."""
    build_model = import_model(package).build_model
    torch.manual_seed(5)
    whole = build_model()
    torch.manual_seed(5)
    meta = build_model(device="meta")
    meta.to_empty(device="cpu")
    if whole.lm_head.weight is whole.model.embed_tokens.weight:
        meta.lm_head.weight = meta.model.embed_tokens.weight  # as FSDP2 keeps one tensor for both
    meta.init_weights()
    for name, value in whole.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    ids_BT = ids(whole.vocab_size, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(meta(ids_BT), whole(ids_BT), atol=0, rtol=0)


def explain_counts(family: str, flags: list[str], package: Path) -> None:
    """`fgc explain` of the example as FAMILY (with FLAGS) states the parameter count and FLOPs
    per token of the model the package (built with the same flags) holds."""
    proc = run_fgc("explain", EXAMPLE, "-D", f"family={family}", *flags)
    assert proc.returncode == 0, proc.stderr
    model = import_model(package).build_model()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in proc.stdout
    flops, _ = model.flops_per_token(128)
    assert f"{flops:,.0f}" in proc.stdout


def features_besides_logits(tmp_path: Path, family: str, flags: list[str]) -> Path:
    """The example built as FAMILY with FLAGS: document masking, activation checkpointing, the
    meta-device build and `fgc explain` work with the family's model. Returns the package."""
    package = tmp_path / "example"
    run_fgc("build", EXAMPLE, "-o", package, "-D", f"family={family}", *flags, check=True)
    packed_documents_keep_apart(package)
    checkpointing_keeps_the_gradients(package)
    meta_build_gets_the_whole_models_values(package)
    explain_counts(family, flags, package)
    return package
