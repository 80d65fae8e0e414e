"""Hugging Face import and export: the pure-torch safetensors reader/writer against the
`safetensors` package, fine-tuning a tiny local model built with transformers' config classes
(no downloads), and exporting packages as model directories transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE, REPO, run_fgc

safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

from fgc_runtime import safetensors as st  # noqa: E402
from fgc_runtime.errors import RunError  # noqa: E402

FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
VOCAB = 300  # > 257: the byte-tokenized corpus fits


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 123, generator=g),
        "b16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "h": torch.randn(4, generator=g).half(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flag": torch.tensor(True),
        "empty": torch.zeros(0, 4),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---- safetensors ----------------------------------------------------------------------------


def test_safetensors_writer_is_byte_identical_to_the_reference(tmp_path):
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    st.save_file(tensors(), ours, metadata={"format": "pt"})
    safetensors_torch.save_file(tensors(), str(ref), metadata={"format": "pt"})
    assert ours.read_bytes() == ref.read_bytes()
    assert same(safetensors_torch.load_file(str(ours)), tensors())


def test_safetensors_reader_reads_the_reference(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors(), str(path), metadata={"format": "pt", "note": "x"})
    assert same(st.load_file(path), tensors())
    assert st.SafetensorsFile(path).metadata == {"format": "pt", "note": "x"}


def test_sharded_save_and_load(tmp_path):
    files = st.save_sharded(tensors(), tmp_path, max_shard_bytes=1000)
    index = json.loads((tmp_path / st.INDEX_FILE).read_text())
    assert files[-1] == st.INDEX_FILE and len(files) > 2
    assert set(index["weight_map"]) == set(tensors())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors().values())
    shards = {}
    for file in files[:-1]:
        shards.update(safetensors_torch.load_file(str(tmp_path / file)))
    assert same(shards, tensors())
    assert same(st.load_dir(tmp_path), tensors())


def test_a_truncated_file_is_a_run_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    st.save_file(tensors(), path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RunError, match="header"):
        st.load_file(path)


# ---- tiny Hugging Face models ----------------------------------------------------------------


def save_tiny(family: str, out: Path, tie: bool = False, shard: str | None = None, **overrides) -> Path:
    """A tiny random model of FAMILY saved with transformers (fp32)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=256,
    )
    common.update(overrides)
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "mistral":
        config, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    else:
        config, cls = transformers.Qwen3Config(head_dim=32, **common), transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


def build(tmp_path, model_dir, *extra) -> Path:
    out = tmp_path / "pkg"
    shards = tmp_path / "shards"
    if not shards.exists():
        run_fgc("data", EXAMPLE.parent / "corpus.txt", "-o", shards, check=True)
    run_fgc(
        "build", FINETUNE, "-o", out, "-D", f"model_dir={model_dir}", "-D", f"data_dir={shards}",
        "-D", "seq_len=32", "-D", "batch_size=4", "-D", "log_every=1", *extra, check=True,
    )
    return out


def train(pkg: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(pkg / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=pkg.parent
    )


def logits(model_dir, ids, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    with torch.no_grad():
        return model, model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, tie, shard",
    [("llama", True, None), ("llama", False, "100KB"), ("mistral", False, None), ("qwen3", True, None)],
)
def test_one_step_at_lr_0_exports_the_original_model(tmp_path, family, tie, shard):
    """Import (sharded or not), one step at learning rate 0, export (sharded when the input
    was): transformers loads the native class and gives back the original logits exactly."""
    src = save_tiny(family, tmp_path / "hf", tie=tie, shard=shard)
    assert (src / st.INDEX_FILE).is_file() == bool(shard)
    pkg = build(tmp_path, src, "-D", "lr=0")
    proc = train(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "final"
    shard_args = ["--max-shard-bytes", 100_000] if shard else []
    proc = train(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp", *shard_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, expected = logits(src, IDS)
    for out in (final, tmp_path / "exp"):
        model, got = logits(out, IDS)
        assert type(model) is type(original)
        assert torch.equal(got, expected)
        assert model.config.tie_word_embeddings == tie
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert (tmp_path / "exp" / st.INDEX_FILE).is_file() == bool(shard)
    assert not (final / st.INDEX_FILE).exists()
    weights = st.load_dir(tmp_path / "exp")
    assert ("lm_head.weight" in weights) == (not tie)  # tied: stored once, as transformers does
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256


@pytest.mark.slow
def test_a_short_finetune_lowers_the_loss(tmp_path):
    src = save_tiny("llama", tmp_path / "hf")
    pkg = build(tmp_path, src, "-D", "lr=3e-3", "-D", "max_steps=25", "-D", "warmup_steps=2")
    proc = train(pkg, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    _, before = logits(src, IDS)
    _, after = logits(tmp_path / "run" / "final", IDS)
    assert not torch.equal(before, after)


@pytest.mark.slow
def test_the_package_loads_the_weights_at_start(tmp_path):
    """build_model reads the safetensors (no step needed); a missing tensor is a one-line error."""
    src = save_tiny("llama", tmp_path / "hf", tie=True)
    pkg = build(tmp_path, src)
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import model;"
        "m = model.build_model(); ids = torch.tensor([[3, 5, 7, 299]]);"
        "torch.save(m(ids).detach(), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(pkg), str(tmp_path / "l.pt")], check=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        expected = hf_model(torch.tensor([[3, 5, 7, 299]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, rtol=0, atol=1e-5)

    weights = st.load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    st.save_file(weights, broken / "model.safetensors")
    proc = train(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run", "--weights", broken)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"{broken / 'model.safetensors'}: error: tensor 'model.layers.1.mlp.up_proj.weight' of the model is missing"
    )


def test_a_config_field_the_template_cannot_represent_is_an_error(tmp_path):
    src = save_tiny("llama", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(config))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("examples/hf_finetune/finetune.yaml:12: error:")
    assert "hidden_act is 'gelu'" in first and "supports only 'silu'" in first
    assert "Traceback" not in proc.stderr

    config["hidden_act"] = "silu"
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(config))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={src}")
    assert proc.returncode == 2
    assert "rope_parameters has rope_type 'longrope'" in proc.stderr.splitlines()[0]


def test_a_missing_model_dir_is_an_error(tmp_path):
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={tmp_path / 'nope'}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"examples/hf_finetune/finetune.yaml:12: error: model_dir {tmp_path / 'nope'}: no such directory"
    )
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg")
    assert proc.returncode == 2
    assert "model_dir is not set: pass -D model_dir=PATH" in proc.stderr.splitlines()[0]
    assert not (tmp_path / "pkg").exists()


CUSTOM_LAYER = '''
import torch
from torch import nn


class PostNormLayer(nn.Module):
    """x = norm(x + attn(x)); x = norm(x + mlp(x)): not a Llama layer."""

    def __init__(self, hidden_size, attention_factory, mlp_factory, norm_factory):
        super().__init__()
        self.self_attn = attention_factory(hidden_size=hidden_size)
        self.mlp = mlp_factory(hidden_size=hidden_size)
        self.attn_norm = norm_factory(hidden_size)
        self.mlp_norm = norm_factory(hidden_size)

    def forward(self, x, ctx):
        x = self.attn_norm(x + self.self_attn(x, ctx))
        return self.mlp_norm(x + self.mlp(x))
'''

CUSTOM_CONFIG = '''-- extends "lm/train.yaml"
[config_metadata]
== super()
-- set ns.hidden_size = 64
-- set ns.num_hidden_layers = 2
-- set ns.tie_word_embeddings = True
-- set ns.seq_len = 32
-- set ns.batch_size = 4
[layer]
.layer: &layer !partial:post_norm.py:PostNormLayer@layer_factory
    attention_factory: *attention
    mlp_factory: *mlp
    norm_factory: *norm
[data]
.data: &data !singleton:fgc.settings:DataSettings@data
    text_files: [corpus.txt]
'''


@pytest.mark.slow
def test_a_custom_architecture_exports_with_remote_code(tmp_path):
    (tmp_path / "post_norm.py").write_text(CUSTOM_LAYER)
    (tmp_path / "custom.yaml").write_text(CUSTOM_CONFIG)
    (tmp_path / "corpus.txt").write_text((EXAMPLE.parent / "corpus.txt").read_text()[:20000])
    pkg = tmp_path / "pkg"
    run_fgc("build", tmp_path / "custom.yaml", "-o", pkg, check=True)
    spec = json.loads((pkg / "hf_config.json").read_text())
    assert spec["remote_code"] is True
    proc = train(pkg, "--max-steps", 2, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fgc.FgcForCausalLM"
    assert {"modeling_fgc.py", "fgc_model.py", "fgc_kernels.py"} <= {p.name for p in final.iterdir()}

    ids = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(2))
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import model;"
        "m = model.build_model(); m.load_state_dict(torch.load(sys.argv[2]));"
        "torch.save(m(torch.load(sys.argv[3])).detach(), sys.argv[4])"
    )
    torch.save(ids, tmp_path / "ids.pt")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002" / "model.pt"
    subprocess.run([sys.executable, "-c", code, str(pkg), str(ckpt), str(tmp_path / "ids.pt"),
                    str(tmp_path / "l.pt")], check=True)
    model, got = logits(final, ids, trust_remote_code=True)
    assert type(model).__name__ == "FgcForCausalLM"
    assert torch.equal(got, torch.load(tmp_path / "l.pt"))
    inner = model.fgc_model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight


@pytest.mark.slow
@pytest.mark.parametrize("trainer, tie", [("fsdp2", True), ("pipeline", False)])
def test_sharded_trainers_load_each_ranks_share_and_export_the_original(tmp_path, trainer, tie):
    """FSDP2 and pipeline ranks build the model on the meta device and read only their share of
    the (sharded) weights: one step at learning rate 0 on 2 ranks exports the original model."""
    import os

    src = save_tiny("llama", tmp_path / "hf", tie=tie, shard="100KB")
    pkg = build(tmp_path, src, "-D", "lr=0", "-D", f"trainer_type={trainer}")
    assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(pkg / "train.py"),
         "--max-steps", "1", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, expected = logits(src, IDS)
    model, got = logits(tmp_path / "run" / "final", IDS)
    assert type(model) is type(original)
    assert torch.equal(got, expected)
