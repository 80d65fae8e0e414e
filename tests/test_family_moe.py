"""The routed mixture-of-experts families (fgc/families/mixtral, fgc/families/qwen3_moe, parts in
fgc/components/moe.py) against transformers' MixtralForCausalLM and Qwen3MoeForCausalLM, and the
trainers' auxiliary (load-balancing) loss.

Tiny random models made with transformers' config classes (no downloads), saved with
save_pretrained so that their checkpoints hold one tensor per expert as transformers writes them
(Mixtral's `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen3-MoE's `mlp.experts.{e}.gate_proj/...`):
the families' experts rules stack them into fgc's 3-D `gate_up_proj` and `down_proj` on the way
in and cut them again on the way out. Logits are compared in fp32 at atol 1e-5 for each feature;
the auxiliary loss with transformers' `outputs.aux_loss` (output_router_logits=True).

Shape legend: B batch, T sequence, V vocabulary size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from conftest import EXAMPLE, REPO, line_of, run_fgc
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES
from fgc_runtime import safetensors as st
from fgc_runtime.hf import TensorMap, load_weights
from fgc_runtime.train import AuxLoss, loss_sum_and_count
from test_families import SMALL, _build, _hf_fields, _hf_model, _ids, _import_model

FINETUNE = REPO / "examples" / "hf_finetune" / "finetune.yaml"
FAMILY = {"mixtral": (MixtralConfig, MixtralForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
MIXTRAL_CASES = {
    "top-2 of 4": dict(num_local_experts=4, num_experts_per_tok=2),
    # a window shorter than the input, a tied head, one expert per token of 3
    "top-1 of 3, window, tied": dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=5, tie_word_embeddings=True),
}
QWEN3_MOE_CASES = {
    "renormalised top-2 of 4": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True),
    "top-3 of 5, not renormalised, biases": dict(
        num_experts=5, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=False, attention_bias=True
    ),
    # layer 0 dense (intermediate_size), layer 1 routed
    "mlp_only_layers": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[0]),
    # every second layer routes: layer 0 dense, layer 1 routed; a window in every layer
    "decoder_sparse_step, window": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=2,
        use_sliding_window=True, sliding_window=5,
    ),
}
CASES = [("mixtral", c) for c in MIXTRAL_CASES] + [("qwen3_moe", c) for c in QWEN3_MOE_CASES]


def _rules(family: str) -> list[dict]:
    return [rule.to_data() for rule in FAMILIES[family].tensors]


def _config(family: str, case: str, **more):
    cls, _ = FAMILY[family]
    cases = MIXTRAL_CASES if family == "mixtral" else QWEN3_MOE_CASES
    return cls(**SMALL, **cases[case], output_router_logits=True, **more)


def _pair(tmp_path: Path, family: str, case: str, **more):
    """A random transformers model of FAMILY saved to TMP_PATH/hf, and fgc's family template
    built from its config.json with its weights loaded through the family's tensor rules."""
    config = _config(family, case, **more)
    hf = _hf_model(FAMILY[family][1], config)
    hf.save_pretrained(tmp_path / "hf")
    package = _build(tmp_path, family, {"hf_fields": _hf_fields(config)})
    ours = _import_model(package).build_model().eval()
    load_weights(ours, tmp_path / "hf", _rules(family))
    return hf, ours, package


@pytest.mark.parametrize("family, case", CASES)
def test_moe_logits_and_aux_loss_match_transformers(tmp_path, family, case):
    """Logits at atol 1e-5; the auxiliary loss the model adds is router_aux_loss_coef times
    transformers' aux_loss, the token loss plus it is transformers' training loss, and its
    gradient (the router's and the layers' below it) is transformers'."""
    hf, ours, _ = _pair(tmp_path, family, case, router_aux_loss_coef=0.25)
    saved = st.load_dir(tmp_path / "hf")
    expert = "block_sparse_moe.experts.0.w1.weight" if family == "mixtral" else "mlp.experts.0.gate_proj.weight"
    assert f"model.layers.1.{expert}" in saved
    ids_BT = _ids(97)
    out = hf(ids_BT, labels=ids_BT, output_router_logits=True)
    logits_BTV = ours(ids_BT)
    assert out.logits.abs().max() > 0.1
    torch.testing.assert_close(logits_BTV, out.logits, atol=1e-5, rtol=0)
    aux = ours.aux_loss()
    torch.testing.assert_close(aux, 0.25 * out.aux_loss, atol=1e-6, rtol=0)
    loss_sum, count = loss_sum_and_count(logits_BTV[:, :-1], ids_BT[:, 1:])
    torch.testing.assert_close(loss_sum / count + aux, out.loss, atol=1e-5, rtol=0)
    # the aux loss alone: the same gradients as transformers' (the routers and the attention below)
    (0.25 * out.aux_loss).backward()
    aux.backward()
    theirs = dict(hf.named_parameters())
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert theirs[name].grad.abs().max() > 0
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, theirs[name].grad, atol=1e-6, rtol=1e-4)
    blocks = ours.moe_blocks()
    if family == "qwen3_moe" and case in ("mlp_only_layers", "decoder_sparse_step, window"):
        assert len(blocks) == 1 and type(ours.model.layers[0].mlp).__name__ == "SwiGLUMLP"
        assert ours.model.layers[0].mlp.intermediate_size == 112
    if case == "decoder_sparse_step, window" or family == "mixtral" and "window" in case:
        assert ours.model.layers[0].self_attn.sliding_window == 5
    if "biases" in case:
        assert ours.model.layers[1].self_attn.o_proj.bias is not None
    if "tied" in case:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_moe_features_matter(tmp_path):
    """The routing options each change the logits, so the comparisons above are not vacuous:
    renormalising the top-k weights, the window, and routing every layer."""
    hf, ours, _ = _pair(tmp_path, "qwen3_moe", "decoder_sparse_step, window")
    ids_BT = _ids(97)
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        torch.testing.assert_close(ours(ids_BT), ref_BTV, atol=1e-5, rtol=0)
        block = ours.moe_blocks()[0]
        block.norm_topk_prob = True
        assert (ours(ids_BT) - ref_BTV).abs().max() > 1e-3
        block.norm_topk_prob = False
        for layer in ours.model.layers:
            layer.self_attn.sliding_window = None
        assert (ours(ids_BT)[:, 5:] - ref_BTV[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_split_and_join_exactly(tmp_path, family):
    """fgc's state dict cut by the family's rules is the saved checkpoint, tensor for tensor:
    expert e's gate rows then its up rows in gate_up_proj, its down projection in down_proj."""
    case = "top-2 of 4" if family == "mixtral" else "mlp_only_layers"
    _, ours, _ = _pair(tmp_path, family, case)
    saved = st.load_dir(tmp_path / "hf")
    ours_hf = TensorMap(_rules(family)).to_hf(ours.state_dict())
    assert sorted(ours_hf) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(ours_hf[name], value), name
    experts = ours.model.layers[1].mlp.experts
    prefix = "model.layers.1.block_sparse_moe.experts.2." if family == "mixtral" else "model.layers.1.mlp.experts.2."
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    half = experts.intermediate_size
    assert torch.equal(experts.gate_up_proj[2, :half], saved[prefix + gate + ".weight"])
    assert torch.equal(experts.gate_up_proj[2, half:], saved[prefix + up + ".weight"])
    assert torch.equal(experts.down_proj[2], saved[prefix + down + ".weight"])


def test_moe_aux_loss_is_none_without_output_router_logits(tmp_path):
    """A config.json with output_router_logits false (as transformers writes by default): the
    model adds no auxiliary loss, as transformers' adds none to its loss."""
    config = MixtralConfig(**SMALL, num_local_experts=4)
    package = _build(tmp_path, "mixtral", {"hf_fields": _hf_fields(config)})
    ours = _import_model(package).build_model()
    ours(_ids(97))
    assert ours.aux_loss() is None and ours.moe_blocks()[0].num_experts == 4


def test_moe_flops_count_the_experts_a_token_uses_and_meta_init_is_the_whole_models(tmp_path):
    """flops_per_token (fgc explain, the MFU line) counts the router and the top-k experts of each
    MoE layer, not every expert; a model built on the meta device and initialised by
    init_weights() (the FSDP2 trainer's way) has the values of the model built whole, the
    experts' 3-D tensors included."""
    build = _import_model(_build(tmp_path, "qwen3_moe", {**SCRATCH, "mlp_only_layers": [0]})).build_model
    torch.manual_seed(0)
    model = build()
    value, formula = model.flops_per_token(16)
    every = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    expert = 3 * 32 * 48  # gate, up and down of one expert: hidden 32, moe_intermediate_size = intermediate 48
    used = every - (4 - 2) * expert  # one MoE layer, 2 of its 4 experts per token
    assert value == 6 * used + 12 * 2 * 32 * 16
    assert f"6*{used:,} +" in formula and "the router and 2 of 4 experts in each of 1 MoE layers" in formula
    torch.manual_seed(0)
    meta = build(device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights()
    whole = model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in whole
    for name, value in meta.state_dict().items():
        assert torch.equal(value, whole[name]), name


# ---- config.json: errors and notes --------------------------------------------------------------


def _fields(family: str, **overrides) -> dict:
    cls, _ = FAMILY[family]
    small = {k: v for k, v in SMALL.items() if k != "attn_implementation"}
    experts = dict(num_local_experts=4) if family == "mixtral" else dict(num_experts=4, moe_intermediate_size=48)
    return {**_hf_fields(cls(**small, **experts, num_experts_per_tok=2)), **overrides}


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise is 0.1, but fgc's mixtral template supports only 0.0"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's mixtral template supports only 'silu'"),
        ("mixtral", {"attention_dropout": 0.1}, "attention_dropout is 0.1, but fgc's mixtral template supports only 0.0"),
        ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok (5) is more than num_local_experts (4)"),
        ("mixtral", {"num_local_experts": 0}, "num_local_experts must be an integer of at least 1, got 0"),
        ("mixtral", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters has rope_type 'longrope'"),
        ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok (5) is more than num_local_experts (4)"),
        ("qwen3_moe", {"num_experts": 3, "num_experts_per_tok": 4}, "num_experts_per_tok (4) is more than num_experts (3)"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer of at least 1, got 0"),
        ("qwen3_moe", {"mlp_only_layers": "0"}, "mlp_only_layers must be a list of layer indices, got '0'"),
        ("qwen3_moe", {"mlp_only_layers": [0, 1]}, "no layer routes (mlp_only_layers and decoder_sparse_step make every layer dense)"),
        ("qwen3_moe", {"decoder_sparse_step": 3}, "no layer routes"),
        ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act is 'gelu', but fgc's qwen3_moe template supports only 'silu'"),
    ],
)
def test_moe_config_fields_it_cannot_represent_are_errors(family, overrides, message):
    problem, _ = FAMILIES[family].classify(_fields(family, **overrides))
    assert problem is not None and message in problem


@pytest.mark.parametrize(
    "family, extra, notes",
    [
        # not MixtralConfig's fields: transformers builds no bias, and neither does the template
        ("mixtral", dict(attention_bias=True, mlp_bias=True), ["attention_bias", "mlp_bias", "unsloth_version"]),
        ("qwen3_moe", dict(mlp_bias=True), ["mlp_bias", "unsloth_version"]),
    ],
)
def test_moe_metadata_and_fields_transformers_does_not_read_are_notes(tmp_path, family, extra, notes):
    fields = _fields(family, **extra, unsloth_version="2024.9")
    problem, ignored = FAMILIES[family].classify(fields)
    assert problem is None and ignored == notes
    model = _import_model(_build(tmp_path, family, {"hf_fields": fields})).build_model()
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_moe_config_errors_at_the_hf_config_line(tmp_path):
    config = Qwen3MoeConfig(**{k: v for k, v in SMALL.items() if k != "attn_implementation"}, num_experts=4, num_experts_per_tok=2)
    config.save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["mlp_only_layers"] = [0, 1]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    proc = run_fgc("build", FINETUNE, "-o", tmp_path / "pkg", "-D", f"model_dir={tmp_path / 'hf'}")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"examples/hf_finetune/finetune.yaml:{line_of(FINETUNE, 'hf_config(')}: error:")
    assert "no layer routes (mlp_only_layers and decoder_sparse_step make every layer dense)" in first
    assert "Traceback" not in proc.stderr and not (tmp_path / "pkg").exists()


def test_moe_template_knob_errors_name_the_template_line():
    template = FAMILIES["qwen3_moe"].template
    with pytest.raises(FgcError) as info:
        compile_config(template, variables={"data_dir": "data", "num_hidden_layers": 2, "mlp_only_layers": [0, 1]})
    [d] = info.value.diagnostics
    assert "no layer routes" in d.message and d.loc.file.endswith("template.yaml") and d.loc.line is not None
    with pytest.raises(FgcError) as info:
        compile_config(FAMILIES["mixtral"].template, variables={"data_dir": "data", "mlp_bias": True})
    [d] = info.value.diagnostics
    assert "mlp_bias: a Mixtral's experts have no biases" in d.message and d.loc.file.endswith("template.yaml")


# ---- the trainers' auxiliary loss ---------------------------------------------------------------


# a small model from scratch (no config.json): the family template's own defaults (4 experts, top-2)
SCRATCH = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)


class _NoAux(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.aux_loss = torch.nn.Linear(2, 2)  # a submodule of that name is not the protocol's method


def test_aux_loss_is_asked_by_the_model_protocol(tmp_path):
    """AuxLoss asks the model's class for aux_loss(): a submodule of that name does not count,
    and a model whose aux_loss() gives None adds nothing. Each forward adds its term over the
    micro-batches of a step, and pop() gives their sum (the rank's mean) once."""
    assert AuxLoss(_NoAux(), 2)() is None
    model = _import_model(_build(tmp_path, "mixtral", {**SCRATCH, "output_router_logits": False})).build_model()
    assert AuxLoss(model, 2)() is None
    model.output_router_logits = True
    aux = AuxLoss(model, 2)
    values = []
    for ids_BT in (_ids(97, seq=9), _ids(97, seq=7)):
        model(ids_BT)
        values.append(model.aux_loss())
        share = aux()
        torch.testing.assert_close(share, values[-1] / 2)
        assert share.requires_grad
    torch.testing.assert_close(aux.pop(), (values[0] + values[1]) / 2)
    assert aux.pop() is None


def test_aux_loss_gradient_over_micro_batches_is_the_stated_objective(tmp_path):
    """The trainer's micro-batch loop (each micro-batch's token loss over the step's target count,
    plus its AuxLoss share, backward one at a time) gives the gradient of the stated objective
    computed in one graph: token loss over all targets + the mean of the micro-batches' aux
    losses."""
    build = _import_model(_build(tmp_path, "mixtral", {**SCRATCH, "router_aux_loss_coef": 0.5})).build_model
    ids_BT = _ids(97, batch=4, seq=11)
    inputs, labels = ids_BT[:, :-1], ids_BT[:, 1:]
    torch.manual_seed(0)
    loop = build()
    aux = AuxLoss(loop, 2)
    for rows in (slice(0, 2), slice(2, 4)):
        loss_sum, _ = loss_sum_and_count(loop(inputs[rows]), labels[rows])
        (loss_sum / labels.numel() + aux()).backward()
    torch.manual_seed(0)
    whole = build()
    loss_sum, count = loss_sum_and_count(whole(inputs), labels)
    per_micro = []
    for rows in (slice(0, 2), slice(2, 4)):
        whole(inputs[rows])
        per_micro.append(whole.aux_loss())
    objective = loss_sum / count + sum(per_micro) / 2
    objective.backward()
    got = dict(loop.named_parameters())
    for name, p in whole.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # the aux term matters here: without it the router's gradient differs
    assert per_micro[0] > 0.5 * 1.9


@pytest.mark.parametrize("feature", ["full checkpointing", "selective checkpointing", "chunked loss"])
def test_aux_loss_gradient_under_checkpointing_and_the_chunked_loss(tmp_path, feature):
    """Activation checkpointing recomputes the layers without recording their routing again, and
    the chunked loss (the head and loss a chunk at a time, through hidden_states()) records it
    once: the token loss plus the aux loss have the same value and gradients as the plain model's."""
    from fgc_runtime.kernels.cross_entropy import LMHeadLoss
    from fgc_runtime.parallel import apply_activation_checkpointing

    build = _import_model(_build(tmp_path, "qwen3_moe", {**SCRATCH, "mlp_only_layers": [0]})).build_model
    ids_BT = _ids(97, batch=2, seq=13)
    inputs, labels = ids_BT[:, :-1], ids_BT[:, 1:]
    values, grads = [], []
    for variant in ("plain", feature):
        torch.manual_seed(0)
        model = build().train()
        if "checkpointing" in variant:
            assert apply_activation_checkpointing(model, variant.split()[0]) == 2
        if variant == "chunked loss":
            loss_sum, count = LMHeadLoss(model, impl="chunked", chunk_size=5)(inputs, labels)
        else:
            loss_sum, count = loss_sum_and_count(model(inputs), labels)
        assert len(model.routing) == 1  # one MoE layer, recorded once
        loss = loss_sum / count + model.aux_loss()
        loss.backward()
        assert len(model.routing) == 1  # the recomputation recorded nothing
        values.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(values[1], values[0], atol=1e-6, rtol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_moe_pipeline_stages_refuse_the_aux_loss_at_run_time(tmp_path):
    """The runtime's own check (a package whose config was changed by hand): a one-line RunError."""
    from fgc_runtime.errors import RunError
    from fgc_runtime.pipeline import check_pipelinable

    model = _import_model(_build(tmp_path, "mixtral", SCRATCH)).build_model(device="meta")
    with pytest.raises(RunError, match=r"^error: the model \(MoECausalLM\) adds an auxiliary loss \(aux_loss\(\)\), which a pipeline cannot add"):
        check_pipelinable(model)
    model.output_router_logits = False
    check_pipelinable(model)


def test_moe_pipeline_is_a_build_error_unless_no_aux_loss(tmp_path):
    """The pipeline trainer cannot add the load-balancing loss (it pools every layer's routing):
    a build error at the model's line of the family template, naming why; without the auxiliary
    loss (output_router_logits: false) the MoE model pipelines."""
    base = ["build", EXAMPLE, "-D", "family=mixtral", "-D", "trainer_type=pipeline", "-D", "nproc=2"]
    proc = run_fgc(*base, "-o", tmp_path / "pkg")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    model_line = next(
        n for n, line in enumerate(FAMILIES["mixtral"].template.read_text().splitlines(), 1) if line.startswith("model:")
    )
    assert first.startswith(f"fgc/families/mixtral/template.yaml:{model_line}: error: the model (MoECausalLM) adds an auxiliary loss")
    assert "a pipeline stage holds only some layers" in first
    assert not (tmp_path / "pkg").exists()
    run_fgc(*base, "-D", "output_router_logits=false", "-o", tmp_path / "ok", check=True)


# ---- packages: fine-tuning, export, trainers ----------------------------------------------------

VOCAB = 300  # > 257: the byte-tokenized corpus fits
IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def _save_tiny(out: Path, family: str, **overrides) -> Path:
    cls, model_cls = FAMILY[family]
    experts = dict(num_local_experts=4) if family == "mixtral" else dict(num_experts=4, moe_intermediate_size=48)
    config = cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, output_router_logits=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=256, **experts, **overrides,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    return out


def _shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    if not shards.exists():
        run_fgc("data", EXAMPLE.parent / "corpus.txt", "-o", shards, check=True)
    return shards


def _run(package: Path, *args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    proc = subprocess.run(
        [*launcher, str(package / "train.py"), *map(str, args)], capture_output=True, text=True,
        cwd=package.parent, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logits(model_dir: Path, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model, model(ids).logits


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "step" in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, overrides",
    [("mixtral", dict(sliding_window=7)), ("qwen3_moe", dict(mlp_only_layers=[0], norm_topk_prob=True))],
)
def test_moe_one_step_at_lr_0_exports_the_original_model(tmp_path, family, overrides):
    """Import the per-expert checkpoint, one step at learning rate 0 (the auxiliary loss added and
    logged), export: transformers' native class gives back the original logits exactly, from
    `final/` and from --export-hf, whose checkpoint holds one tensor per expert again."""
    src = _save_tiny(tmp_path / "hf", family, **overrides)
    pkg = tmp_path / "pkg"
    run_fgc(
        "build", FINETUNE, "-o", pkg, "-D", f"model_dir={src}", "-D", f"data_dir={_shards(tmp_path)}",
        "-D", "seq_len=32", "-D", "batch_size=4", "-D", "log_every=1", "-D", "lr=0", check=True,
    )
    assert "TENSOR_RULES" in (pkg / "model.py").read_text()
    _run(pkg, "--max-steps", 1, "--output-dir", tmp_path / "run")
    [record] = _records(tmp_path / "run")
    assert 0 < record["aux_loss"] < 0.01  # router_aux_loss_coef 0.001 x about num_experts_per_tok
    _run(pkg, "--output-dir", tmp_path / "run", "--export-hf", tmp_path / "exp")
    original, expected = _logits(src)
    for out in (tmp_path / "run" / "final", tmp_path / "exp"):
        model, got = _logits(out)
        assert type(model) is FAMILY[family][1]
        assert torch.equal(got, expected)
        for field in ("num_experts_per_tok", "sliding_window", "norm_topk_prob", "mlp_only_layers", "router_aux_loss_coef"):
            assert getattr(model.config, field, None) == getattr(original.config, field, None), field
    weights = st.load_dir(tmp_path / "exp")
    assert sorted(weights) == sorted(st.load_dir(src))
    assert not any("gate_up_proj" in name for name in weights)


@pytest.mark.slow
def test_mixtral_from_scratch_trainers_match_one_process_and_export(tmp_path):
    """The main example with -D family=mixtral (4 experts, top-2) and a large aux coefficient, so
    that a wrong normalisation of the aux term would show: a step of 8 sequences as one process
    in 4 micro-batches, as 2 DDP ranks of 2 micro-batches (with activation checkpointing), FSDP2 on the meta device (the experts'
    3-D tensors sharded over the ranks like every parameter), and FSDP2 with tensor parallelism
    (attention split, the MoE blocks whole on each rank) log the same losses, gradient norms and
    aux_loss (the mean of the 4 forwards' aux terms) for 3 steps (tensor parallelism: for 2, then
    close); the loss decreases; final/ is a MixtralForCausalLM with the package's logits."""
    common = [
        "-D", "family=mixtral", "-D", "max_steps=3", "-D", "warmup_steps=1", "-D", "lr=3e-3", "-D", "log_every=1",
        "-D", "eval_every=0", "-D", "batch_size=8", "-D", "micro_batch_size=2", "-D", "seq_len=32",
        "-D", "router_aux_loss_coef=1.0",
    ]
    runs = {
        "one": ([], 1),
        "ddp": (["-D", "nproc=2", "-D", "activation_checkpointing=full"], 2),
        "fsdp2": (["-D", "trainer_type=fsdp2", "-D", "nproc=2"], 2),
        "tp": (["-D", "trainer_type=fsdp2", "-D", "nproc=2", "-D", "tensor_degree=2"], 2),
    }
    records = {}
    for name, (extra, nproc) in runs.items():
        pkg = tmp_path / name
        run_fgc("build", EXAMPLE, "-o", pkg, *common, *extra, check=True)
        if name == "one":
            assert json.loads((pkg / "hf_config.json").read_text())["config"]["architectures"] == ["MixtralForCausalLM"]
        if name == "fsdp2":
            assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        if name == "tp":
            plan = json.loads((pkg / "manifest.json").read_text())["plan"]["tensor_parallel"]
            assert plan["colwise"] == ["q_proj", "k_proj", "v_proj"] and plan["rowwise"] == ["o_proj"]
        _run(pkg, "--output-dir", tmp_path / f"{name}_run", nproc=nproc)
        records[name] = _records(tmp_path / f"{name}_run")
    reference = records["one"]
    losses = [r["loss"] for r in reference]
    assert len(losses) == 3 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
    assert all(0.5 < r["aux_loss"] < 4 for r in reference)
    for name, got in records.items():
        for key in ("loss", "aux_loss", "grad_norm"):
            # tensor parallelism sums the attention's partial products in another order: after two
            # Adam updates a token may pick another expert (routing is discrete), so its third
            # step is only close
            steps = 2 if name == "tp" else 3
            expected = [r[key] for r in reference]
            assert [r[key] for r in got[:steps]] == pytest.approx(expected[:steps], rel=1e-4), (name, key)
            assert [r[key] for r in got] == pytest.approx(expected, rel=1e-2), (name, key)
    ids_BT = torch.randint(0, 257, (2, 23), generator=torch.Generator().manual_seed(3))
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import model;"
        "m = model.build_model(); m.load_state_dict(torch.load(sys.argv[2])); m.eval();"
        "torch.save(m(torch.load(sys.argv[3])).detach(), sys.argv[4])"
    )
    torch.save(ids_BT, tmp_path / "ids.pt")
    ckpt = tmp_path / "ddp_run" / "checkpoints" / "step-00000003" / "model.pt"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ddp"), str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
        check=True,
    )
    model, got = _logits(tmp_path / "ddp_run" / "final", ids_BT)
    assert type(model) is MixtralForCausalLM
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    # two implementations of one model (transformers' Mixtral, the generated one) on the same
    # weights: equal to float noise, as the other families' checks (bitwise on some CPUs, not on
    # an AMD EPYC, whose matrix kernels order the sums otherwise)
    torch.testing.assert_close(got, torch.load(tmp_path / "l.pt"), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_qwen3_moe_from_scratch_trains_and_exports(tmp_path):
    """The main example with -D family=qwen3_moe and a dense first layer trains with packed-document
    masking and selective activation checkpointing (loss decreasing, aux_loss logged) and its
    final/ is a Qwen3MoeForCausalLM."""
    pkg = tmp_path / "pkg"
    run_fgc(
        "build", EXAMPLE, "-o", pkg, "-D", "family=qwen3_moe", "-D", "mlp_only_layers=[0]", "-D", "max_steps=4",
        "-D", "document_masking=true", "-D", "activation_checkpointing=selective",
        "-D", "warmup_steps=1", "-D", "log_every=1", "-D", "eval_every=0", "-D", "seq_len=32", "-D", "batch_size=4",
        check=True,
    )
    _run(pkg, "--output-dir", tmp_path / "run")
    records = _records(tmp_path / "run")
    assert len(records) == 4 and records[-1]["loss"] < records[0]["loss"]
    assert all(0 < r["aux_loss"] < 0.01 for r in records)
    model, _ = _logits(tmp_path / "run" / "final", IDS % 257)
    assert type(model) is Qwen3MoeForCausalLM and model.config.mlp_only_layers == [0]
