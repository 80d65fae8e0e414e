"""A vocabulary that grows (issue #16): fine-tuning a pretrained Hugging Face
model on token shards whose meta.json has a larger ``vocab_size`` (a chat template added
``<|im_start|>`` and ``<|im_end|>``) builds the model with the data's vocabulary; the plan and
``fgc explain`` say so; ``load_weights`` gives the embedding (and an untied head) the
checkpoint's rows first and the mean of them in each new row, on every trainer's loading path;
the export writes the grown vocabulary. Tiny random models made with transformers' config
classes, no downloads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_fgc
from family_checks import import_model, logged_losses, train

transformers = pytest.importorskip("transformers")

from fgc.build import build_package, compile_config  # noqa: E402
from fgc_runtime import safetensors as st  # noqa: E402
from fgc_runtime.data import write_token_shards  # noqa: E402
from fgc_runtime.errors import RunError  # noqa: E402
from fgc_runtime.hf import load_weights  # noqa: E402

FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
VOCAB = 300  # the pretrained model's
GROWN = 302  # the data's: two ids more, as <|im_start|> and <|im_end|> add

# family -> (transformers' config and model classes, the fields of a tiny model, the names of its
# embedding and head in the checkpoint)
FAMILIES = {
    "llama": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        ("model.embed_tokens.weight", "lm_head.weight"),
    ),
    "gpt_neox": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
        ("gpt_neox.embed_in.weight", "embed_out.weight"),
    ),
    "gpt2": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
        ("transformer.wte.weight", "lm_head.weight"),
    ),
}


def save_tiny(out: Path, family: str = "llama", tie: bool = False) -> Path:
    """A tiny random FAMILY model of VOCAB ids saved with transformers (fp32)."""
    config_name, model_name, fields, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=256, **fields
    )
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(out)
    return out


def shards(out: Path, vocab: int = GROWN) -> Path:
    """Token shards of VOCAB ids whose documents use the highest ids too (the added tokens)."""
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (60,), generator=gen).tolist() + [vocab - 1] for _ in range(24)]
    write_token_shards(out, docs, vocab_size=vocab, eos_id=vocab - 1, tokenizer="byte")
    return out


def build(tmp_path: Path, model_dir: Path, data_dir: Path, name: str = "pkg", **knobs) -> Path:
    """The fine-tune example over MODEL_DIR and DATA_DIR, built into TMP_PATH/NAME."""
    variables = {"model_dir": str(model_dir), "data_dir": str(data_dir), "seq_len": 32, "batch_size": 4,
                 "log_every": 1, **knobs}
    out = tmp_path / name
    build_package(compile_config(FINETUNE, variables=variables), out, smoke=False)
    return out


def checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of MODEL_DIR's model.safetensors."""
    return st.load_file(model_dir / "model.safetensors")


def assert_grown(grown: torch.Tensor, old: torch.Tensor, rows: int = GROWN) -> None:
    """GROWN holds OLD's rows first, then new rows up to ROWS, each the mean of OLD's rows."""
    assert grown.shape == (rows, *old.shape[1:])
    assert torch.equal(grown[:VOCAB], old)
    mean = old.float().mean(dim=0)
    for row in grown[VOCAB:]:
        torch.testing.assert_close(row, mean, rtol=0, atol=1e-7)


# ---- build: the plan, explain ---------------------------------------------------------------


def test_the_plan_and_explain_show_the_growth(tmp_path):
    """The model is built with the data's vocabulary; the plan (manifest.json, train.py's PLAN),
    model.py, the export spec and `fgc explain` say it grows, from what and where to."""
    src = save_tiny(tmp_path / "hf")
    data = shards(tmp_path / "shards")
    pkg = build(tmp_path, src, data)
    growth = {"from": VOCAB, "to": GROWN, "source": str(data / "meta.json"), "new_rows": "the mean of the old rows"}
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["plan"]["vocab_growth"] == growth
    train_py = (pkg / "train.py").read_text()
    assert '"vocab_growth": {' in train_py and f'"to": {GROWN},' in train_py
    assert f"vocab_size={GROWN}," in (pkg / "model.py").read_text()
    assert json.loads((pkg / "hf_config.json").read_text())["config"]["vocab_size"] == GROWN
    model = import_model(pkg).build_model(device="meta")
    assert model.model.embed_tokens.weight.shape[0] == GROWN and model.lm_head.weight.shape[0] == GROWN

    flags = ["-D", f"model_dir={src}", "-D", f"data_dir={data}", "-D", "seq_len=32", "-D", "batch_size=4"]
    proc = run_fgc("explain", FINETUNE, *flags)
    assert proc.returncode == 0, proc.stderr
    assert (
        f"  vocabulary grows from {VOCAB} to {GROWN} rows at load ({data / 'meta.json'}): the embedding and "
        "the untied head get 2 new rows, set to the mean of the old rows\n"
    ) in proc.stdout
    proc = run_fgc("explain", FINETUNE, "model.vocab_size", *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"model.vocab_size = {GROWN}\n")
    assert f"  grown      from the pretrained {VOCAB} to {GROWN} ({data / 'meta.json'})\n" in proc.stdout


def test_explain_says_a_tied_embedding_grows_once(tmp_path):
    src = save_tiny(tmp_path / "hf", tie=True)
    data = shards(tmp_path / "shards")
    proc = run_fgc("explain", FINETUNE, "-D", f"model_dir={src}", "-D", f"data_dir={data}")
    assert proc.returncode == 0, proc.stderr
    assert "the embedding (tied to the head, so once) get 2 new rows, set to the mean of the old rows" in proc.stdout


def test_a_vocabulary_the_model_covers_changes_nothing(tmp_path):
    """Shards of fewer ids than the model (or as many), or no readable meta.json at build time:
    the package is the one built without growth, byte for byte, and its plan has no
    vocab_growth."""
    src = save_tiny(tmp_path / "hf")
    data = tmp_path / "shards"
    missing = build(tmp_path, src, data, "missing")  # no data directory yet: nothing to read
    for vocab in (257, VOCAB):
        shards(data, vocab)
        pkg = build(tmp_path, src, data, f"v{vocab}")
        for name in ("train.py", "model.py", "hf_config.json"):
            assert (pkg / name).read_bytes() == (missing / name).read_bytes(), (vocab, name)
        assert "vocab_growth" not in json.loads((pkg / "manifest.json").read_text())["plan"]


def test_a_model_trained_from_scratch_does_not_grow(tmp_path):
    """Without pretrained weights the config's vocabulary is the model's, as before: the trainer's
    check at start still names the shards."""
    data = shards(tmp_path / "shards")
    from fgc.families import FAMILIES as REGISTRY

    compiled = compile_config(REGISTRY["llama"].template, variables={"data_dir": str(data)})
    assert compiled.ctx.plan.vocab_growth is None
    assert compiled.ir.node(compiled.ir.node(compiled.ir.targets["model"]).kwargs["vocab_size"]).value == 257


def test_a_vocab_size_knob_above_the_pretrained_one_grows_the_same_way(tmp_path):
    """-D vocab_size larger than config.json's (and than the data's) grows to it; the plan's
    source is the -D."""
    src = save_tiny(tmp_path / "hf")
    pkg = build(tmp_path, src, shards(tmp_path / "shards"), vocab_size=320)
    growth = json.loads((pkg / "manifest.json").read_text())["plan"]["vocab_growth"]
    assert growth == {"from": VOCAB, "to": 320, "source": "-D vocab_size=320 (fgc/families/llama/template.yaml:19)",
                      "new_rows": "the mean of the old rows"}
    with contextlib.redirect_stdout(io.StringIO()):
        model = import_model(pkg).build_model()
    assert_grown(model.model.embed_tokens.weight.detach(), checkpoint(src)["model.embed_tokens.weight"], 320)


# ---- load_weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("family, tie", [("llama", False), ("llama", True), ("gpt_neox", False), ("gpt2", True)])
def test_load_weights_grows_the_embedding_and_head(tmp_path, family, tie):
    """Each family's embedding (and untied head) keeps the checkpoint's rows and gets the mean of
    them in each new row; a tied head is the embedding, grown once; every other tensor is the
    checkpoint's; one line says the vocabulary grew."""
    src = save_tiny(tmp_path / "hf", family, tie)
    pkg = build(tmp_path, src, shards(tmp_path / "shards"), **({"seq_len": 64} if family == "gpt2" else {}))
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        model = import_model(pkg).build_model()
    embed_name, head_name = FAMILIES[family][3]
    weights = checkpoint(src)
    assert_grown(model.model.embed_tokens.weight.detach(), weights[embed_name])
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert head_name not in weights or torch.equal(weights[head_name], weights[embed_name])
        names = "model.embed_tokens.weight"
    else:
        assert_grown(model.lm_head.weight.detach(), weights[head_name])
        names = "model.embed_tokens.weight, lm_head.weight"
    assert said.getvalue() == (
        f"{src / 'model.safetensors'}: the vocabulary grew from {VOCAB} to {GROWN} tokens: {names} got 2 new rows, "
        "each the mean of the old rows\n"
    )
    # the rest is the checkpoint's: the grown model's logits of old ids over old ids are the original's
    original = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids_BT = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids_BT)[..., :VOCAB], original(ids_BT).logits, rtol=0, atol=1e-5)


def test_other_shape_differences_are_still_errors(tmp_path):
    """Only the vocabulary's rows grow: an embedding of another width, or a layer's weight with
    fewer rows, is the one-line error it was; a checkpoint with more ids than the model too."""
    src = save_tiny(tmp_path / "hf")
    pkg = build(tmp_path, src, shards(tmp_path / "shards"))
    model = import_model(pkg).build_model(device="meta").to_empty(device="cpu")
    weights = checkpoint(src)
    cases = [
        ("model.embed_tokens.weight", torch.zeros(VOCAB, 32), f"has shape [{VOCAB}, 32], the model's is [{GROWN}, 64]"),
        ("model.layers.0.mlp.up_proj.weight", torch.zeros(90, 64), "has shape [90, 64], the model's is [96, 64]"),
        ("lm_head.weight", torch.zeros(GROWN + 1, 64), f"has shape [{GROWN + 1}, 64], the model's is [{GROWN}, 64]"),
    ]
    for name, value, message in cases:
        broken = tmp_path / name
        broken.mkdir()
        (broken / "config.json").write_text((src / "config.json").read_text())
        st.save_file({**weights, name: value}, broken / "model.safetensors")
        with pytest.raises(RunError) as err:
            load_weights(model, broken)
        assert str(err.value) == f"{broken / 'model.safetensors'}: error: tensor {name!r} {message}"
    proc = train(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run", "--weights", tmp_path / cases[0][0])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"{tmp_path / cases[0][0] / 'model.safetensors'}: error: tensor 'model.embed_tokens.weight' {cases[0][2]}"
    )


# ---- training and export --------------------------------------------------------------------


def exported_is_grown(out: Path, src: Path, tie: bool) -> None:
    """OUT, an export of a model trained at learning rate 0 from SRC: config.json's vocab_size
    is the grown one, transformers loads it with grown shapes, the old rows are SRC's and each new
    row their mean; the logits of old ids over old ids are the original model's."""
    assert json.loads((out / "config.json").read_text())["vocab_size"] == GROWN
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    weights = checkpoint(src)
    assert_grown(model.model.embed_tokens.weight.detach(), weights["model.embed_tokens.weight"])
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert_grown(model.lm_head.weight.detach(), weights["lm_head.weight"])
    original = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids_BT = torch.randint(0, GROWN, (2, 13), generator=torch.Generator().manual_seed(1)).clamp(max=VOCAB - 1)
    with torch.no_grad():
        got_BTV = model(ids_BT).logits
        assert got_BTV.shape[-1] == GROWN
        torch.testing.assert_close(got_BTV[..., :VOCAB], original(ids_BT).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_basic_trainer_trains_on_the_grown_vocabulary_and_exports_it(tmp_path):
    """A run on the shards needs no vocabulary error: the loss is finite on ids the checkpoint
    never had; final/ and --export-hf write the grown vocabulary (at learning rate 0: the grown
    weights themselves). With a learning rate, the new rows train."""
    src = save_tiny(tmp_path / "hf")
    data = shards(tmp_path / "shards")
    pkg = build(tmp_path, src, data, lr=0)
    proc = train(pkg, "--max-steps", 2, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the vocabulary grew from {VOCAB} to {GROWN} tokens" in proc.stdout
    assert len(logged_losses(tmp_path / "run")) == 2
    proc = train(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        exported_is_grown(out, src, tie=False)

    pkg = build(tmp_path, src, data, "trained", lr=1e-2)
    proc = train(pkg, "--max-steps", 2, "--output-dir", tmp_path / "trained")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "trained" / "final"))
    new_rows = trained.model.embed_tokens.weight[VOCAB:].detach()
    assert not torch.equal(new_rows[0], new_rows[1])  # the added tokens' rows learned apart


@pytest.mark.slow
@pytest.mark.parametrize("trainer, tie", [("fsdp2", True), ("pipeline", False)])
def test_sharded_trainers_grow_each_ranks_share(tmp_path, trainer, tie):
    """FSDP2 and pipeline ranks build the model on the meta device and grow their share while
    they load it: one step at learning rate 0 on 2 ranks gives the basic trainer's loss and
    exports the grown model."""
    src = save_tiny(tmp_path / "hf", tie=tie)
    data = shards(tmp_path / "shards")
    basic = build(tmp_path, src, data, "basic", lr=0)
    proc = train(basic, "--max-steps", 1, "--output-dir", tmp_path / "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg = build(tmp_path, src, data, trainer, lr=0, trainer_type=trainer, nproc=2)
    assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(pkg / "train.py"),
         "--max-steps", "1", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"the vocabulary grew from {VOCAB} to {GROWN} tokens") == 1  # rank 0 says it
    assert logged_losses(tmp_path / "run") == pytest.approx(logged_losses(tmp_path / "ref"), rel=2e-5)
    exported_is_grown(tmp_path / "run" / "final", src, tie)
