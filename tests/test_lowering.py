"""Unit tests of the lowering passes (fgc_lowering): variables, callables, argument binding and
the training plan, each error at the file:line the user wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import LIBRARY_DIR, render, search_path_for
from fgc.ir import IRGraph
from fgc.settings import BasicTrainer, DataSettings, DDPTrainer
from fgc_lowering.context import LoweringContext
from fgc_lowering.passes.bind_arguments import BindArguments
from fgc_lowering.passes.plan_training import PlanTraining
from fgc_lowering.passes.resolve_callables import ResolveCallables
from fgc_lowering.passes.resolve_variables import ResolveVariables
from fgc_lowering.pipeline import PASS_NAMES, lower
from fgc_lowering.plan import Plan

REPO = Path(__file__).resolve().parent.parent
LIB_TRAIN = str(LIBRARY_DIR / "lm" / "train.yaml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def loaded(tmp_path: Path, text: str, variables: dict | None = None):
    cfg = write(tmp_path / "c.yaml", text)
    ir = load(render(cfg, variables=variables))
    ctx = LoweringContext(cfg.resolve(), search_path_for(cfg.resolve()), dict(variables or {}))
    return cfg.resolve(), ir, ctx


def run_passes(ir: IRGraph, ctx: LoweringContext, *passes) -> IRGraph:
    for p in passes:
        ir = p.run(ir, ctx)
    return ir


def diags(ctx: LoweringContext) -> list[tuple[str, int | None, str]]:
    return [(d.loc.file, d.loc.line, d.message) for d in ctx.sink.errors]


def test_pipeline_order():
    assert PASS_NAMES == (
        "resolve-variables",
        "resolve-callables",
        "bind-arguments",
        "check-types",
        "validate-model",
        "plan-training",
        "select-kernels",
        "check-optimization",
    )


# --- resolve-variables -------------------------------------------------------------------------

VARS = """\
x: !var lr
y: !var {name: wd, default: 0.5}
z: !var [bs, 3]
opt: !partial:torch.optim:SGD
    lr: !var lr
    momentum: !var [mom, 0.9]
items: [!var lr, !var [n, 4]]
"""


def test_define_binds_var(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, VARS)
    ctx.variables = {"lr": 0.25, "bs": 16}
    ir = ResolveVariables().run(ir, ctx)
    assert ctx.sink.errors == []
    x = ir.node(ir.targets["x"])
    assert (x.kind, x.value, x.loc.line) == ("value", 0.25, 1)
    assert ir.node(ir.targets["z"]).value == 16
    opt = ir.node("opt")
    assert ir.node(opt.kwargs["lr"]).value == 0.25
    assert [ir.node(a).value for a in ir.node("items").args] == [0.25, 4]


def test_default_used_when_unbound(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, VARS)
    ctx.variables = {"lr": 1}
    ir = ResolveVariables().run(ir, ctx)
    assert ctx.sink.errors == []
    assert ir.node(ir.targets["y"]).value == 0.5
    assert ir.node(ir.targets["z"]).value == 3
    assert ir.node(ir.node("opt").kwargs["momentum"]).value == 0.9
    assert all(n.kind != "var" for n in ir.nodes())


def test_resolve_variables_does_not_change_its_input(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, VARS)
    ctx.variables = {"lr": 1}
    ResolveVariables().run(ir, ctx)
    assert ir.node("x").kind == "var"


def test_unbound_var_is_an_error_at_its_line(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "a: 1\n\nopt: !partial:torch.optim:SGD\n    lr: !var lr\n")
    ResolveVariables().run(ir, ctx)
    assert diags(ctx) == [(str(cfg), 4, "variable 'lr' is not bound and has no default")]
    assert ctx.sink.errors[0].hint.startswith("pass -D lr=VALUE")


def test_every_unbound_var_reported(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "a: !var p\nb: !var q\nc: !var [r, 1]\n")
    ResolveVariables().run(ir, ctx)
    assert [(line, msg.split("'")[1]) for _, line, msg in diags(ctx)] == [(1, "p"), (2, "q")]


def test_var_default_that_is_a_var(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "x: !var {name: a, default: !var [b, 3]}\n")
    ir = ResolveVariables().run(ir, ctx)
    assert ctx.sink.errors == []
    assert ir.node(ir.targets["x"]).value == 3


def test_define_through_compile_config(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "lin: !singleton:torch.nn:Linear\n    in_features: !var n\n    out_features: 2\n",
    )
    with pytest.raises(FgcError) as info:
        compile_config(cfg)
    assert [(d.loc.line, d.message) for d in info.value.diagnostics] == [
        (2, "variable 'n' is not bound and has no default")
    ]


# --- resolve-callables -------------------------------------------------------------------------


def test_callables_resolve(tmp_path):
    import torch

    cfg, ir, ctx = loaded(
        tmp_path,
        "a: !singleton:torch.nn:Linear [1, 1]\n"
        "b: !partial:torch.nn.SiLU\n"
        "c: !factory:torch.nn:Module.train\n",
    )
    ResolveCallables().run(ir, ctx)
    assert ctx.sink.errors == []
    assert ctx.symbols["a"].obj is torch.nn.Linear
    assert (ctx.symbols["b"].module, ctx.symbols["b"].qualname) == ("torch.nn", "SiLU")
    assert ctx.symbols["c"].obj is torch.nn.Module.train


def test_file_and_relative_module_specs(tmp_path):
    write(tmp_path / "mods" / "helpers.py", "def make(n):\n    return n * 2\n")
    write(
        tmp_path / "localmod.py", "class Thing:\n    def __init__(self, k=1):\n        self.k = k\n"
    )
    cfg, ir, ctx = loaded(
        tmp_path, "a: !singleton:mods/helpers.py:make [2]\nb: !singleton:.localmod:Thing {k: 3}\n"
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert ctx.sink.errors == []
    assert ctx.symbols["a"].obj(4) == 8
    assert ctx.symbols["a"].file == str(tmp_path.resolve() / "mods" / "helpers.py")
    assert ctx.symbols["b"].file == str(tmp_path.resolve() / "localmod.py")


def test_file_spec_is_relative_to_the_template_that_wrote_it(tmp_path):
    write(tmp_path / "lib" / "parts" / "helpers.py", "def make():\n    return 1\n")
    write(tmp_path / "lib" / "parts" / "base.yaml", "[m]\nthing: !singleton:helpers.py:make\n")
    cfg = write(tmp_path / "cfg" / "c.yaml", '-- extends "parts/base.yaml"\n')
    ir = load(render(cfg, [str(tmp_path / "lib")]))
    ctx = LoweringContext(cfg.resolve(), search_path_for(cfg.resolve(), [str(tmp_path / "lib")]))
    ResolveCallables().run(ir, ctx)
    assert ctx.sink.errors == []
    assert ctx.symbols["thing"].file == str((tmp_path / "lib" / "parts" / "helpers.py").resolve())


def test_unknown_module_symbol_and_malformed_specs(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path,
        "ok: !singleton:torch.nn:ReLU\n"
        "bad1: !singleton:no_such_mod_xyz:Foo\n"
        "bad2: !singleton:torch.nn:NoSuchThing\n"
        "\n"
        "bad3: !singleton:torch.nn:Lin:ear\n"
        "bad4: !singleton:torch.nn:\n"
        "bad5: !singleton:Linear\n"
        "nested:\n"
        "  - !factory:torch.nn:Nope\n",
    )
    ResolveCallables().run(ir, ctx)
    got = diags(ctx)
    assert [(f, line) for f, line, _ in got] == [(str(cfg), n) for n in (2, 3, 5, 6, 7, 9)]
    messages = [m for _, _, m in got]
    assert messages[0] == "'no_such_mod_xyz:Foo': no module named 'no_such_mod_xyz'"
    assert messages[1] == "'torch.nn:NoSuchThing': 'torch.nn' has no attribute 'NoSuchThing'"
    assert messages[2] == "malformed spec 'torch.nn:Lin:ear': more than one ':'"
    assert messages[3].startswith("malformed spec 'torch.nn:'")
    assert messages[4] == "malformed spec 'Linear'"
    assert messages[5] == "'torch.nn:Nope': 'torch.nn' has no attribute 'Nope'"
    assert set(ctx.symbols) == {"ok"}


def test_spec_error_in_parent_template_at_parent_line(tmp_path):
    parent = write(tmp_path / "p.yaml", "[m]\nm: !singleton:torch.nn:Nope\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n')
    ir = load(render(cfg))
    ctx = LoweringContext(cfg.resolve(), search_path_for(cfg.resolve()))
    ResolveCallables().run(ir, ctx)
    assert [(d.loc.file, d.loc.line) for d in ctx.sink.errors] == [(str(parent.resolve()), 2)]


def test_not_callable(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "a: 1\nb: !singleton:math:pi\n")
    ResolveCallables().run(ir, ctx)
    assert diags(ctx) == [(str(cfg), 2, "'math:pi' is not callable")]


# --- bind-arguments ----------------------------------------------------------------------------


def test_unknown_keyword_at_its_key_line_with_hint(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path,
        "optimizer: !partial:torch.optim:AdamW\n"
        "    betas: !tuple [0.9, 0.95]\n"
        "\n"
        "    lrr: 0.1\n"
        "    weight_decay: 0.0\n",
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert diags(ctx) == [(str(cfg), 4, "torch.optim:AdamW has no parameter 'lrr'")]
    assert ctx.sink.errors[0].hint == "did you mean 'lr'?"


def test_unknown_keyword_without_close_match_lists_parameters(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "a: !singleton:torch.nn:Linear\n    zzzzzz: 1\n")
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert diags(ctx) == [(str(cfg), 2, "torch.nn:Linear has no parameter 'zzzzzz'")]
    assert ctx.sink.errors[0].hint.startswith("parameters: in_features, out_features, bias")


def test_unknown_keyword_from_child_override_at_child_line(tmp_path):
    write(tmp_path / "p.yaml", "[o]\noptimizer: !partial:torch.optim:AdamW\n    lr: 0.1\n")
    cfg = write(tmp_path / "c.yaml", '-- extends "p.yaml"\n[o]\n== super()\n    lrr: 0.2\n')
    ir = load(render(cfg))
    ctx = LoweringContext(cfg.resolve(), search_path_for(cfg.resolve()))
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert [(d.loc.file, d.loc.line) for d in ctx.sink.errors] == [(str(cfg.resolve()), 4)]


def test_missing_required_argument_for_singleton(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "a: 1\nlin: !singleton:torch.nn:Linear\n    in_features: 3\n")
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert diags(ctx) == [
        (str(cfg), 2, "torch.nn:Linear: missing a required argument: 'out_features'")
    ]


def test_missing_required_argument_for_factory(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "lin: !factory:torch.nn:Linear [3]\n")
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert [line for _, line, _ in diags(ctx)] == [1]


def test_partial_allows_missing_arguments(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path,
        "p: !partial:torch.nn:Linear\n    in_features: 3\n"
        "opt: !partial:torch.optim:AdamW {lr: 0.1}\n",
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert ctx.sink.errors == []


def test_partial_still_checks_keywords_and_positionals(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path, "p: !partial:torch.nn:Linear {bogus: 1}\nq: !partial:torch.nn:ReLU [1, 2, 3]\n"
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert [line for _, line, _ in diags(ctx)] == [1, 2]
    assert diags(ctx)[1][2] == "torch.nn:ReLU: too many positional arguments"


def test_positional_and_keyword_forms_bind(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path,
        "a: !singleton:torch.nn:Linear [2, 3]\n"
        "b: !singleton:torch.nn:Linear {arg0: 2, arg1: 3, bias: false}\n"
        "c: !singleton:torch.nn:Linear {args: [2], kwargs: {out_features: 3}}\n",
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert ctx.sink.errors == []


def test_var_keyword_callable_accepts_any_keyword(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "d: !singleton:builtins:dict {anything: 1, other: 2}\n")
    run_passes(ir, ctx, ResolveCallables(), BindArguments())
    assert ctx.sink.errors == []


def test_several_independent_errors_reported_together(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        "optimizer: !partial:torch.optim:AdamW\n"
        "    lrr: 0.1\n"
        "lin: !singleton:torch.nn:Linear\n"
        "    in_features: 3\n"
        "relu: !singleton:torch.nn:ReLU [1, 2, 3]\n"
        "emb: !singleton:torch.nn:Embedding\n"
        "    num_embedings: 3\n",
    )
    with pytest.raises(FgcError) as info:
        compile_config(cfg)
    got = sorted((d.loc.file, d.loc.line) for d in info.value.diagnostics)
    assert got == [(str(cfg.resolve()), n) for n in (2, 3, 5, 7)]
    hints = {d.loc.line: d.hint for d in info.value.diagnostics}
    assert hints[2] == "did you mean 'lr'?"
    assert hints[7] == "did you mean 'num_embeddings'?"


def test_lowering_reports_independent_errors_of_every_pass(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path, "a: !singleton:torch.nn:Nope\nb: !singleton:torch.nn:Linear {lrr: 1}\n"
    )
    with pytest.raises(FgcError) as info:
        lower(ir, ctx)
    # resolve-callables fails on line 1, bind-arguments on line 2; plan-training (which needs a
    # clean graph) does not run, so there is no "needs the targets" error
    assert [d.loc.line for d in info.value.diagnostics] == [1, 2]


def test_dump_after_a_pass(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "x: !var [n, 3]\n")
    dumps: list[str] = []
    with pytest.raises(FgcError):  # no trainer targets: plan-training fails at the end
        lower(ir, ctx, dump_after="resolve-variables", dump=dumps.append)
    assert len(dumps) == 2
    assert dumps[0].startswith("# IR after resolve-variables: ")
    assert '"value": 3' in dumps[0]
    # the training program is made later, by plan-training
    assert dumps[1] == "# training program after resolve-variables: not planned yet (the plan-training pass makes it)"


# --- plan-training -----------------------------------------------------------------------------

TRAINER = """\
-- extends "lm/train.yaml"
[data]
.data: &data !singleton:fgc.settings:DataSettings@data
    data_dir: tokens
[trainer]
trainer: !singleton:fgc.settings:{{ {"DDPTrainer": "DDPTrainer", "BasicTrainer": "BasicTrainer"}[t_class | default("DDPTrainer")] }}@trainer
    data: *data
    max_steps: {{ t_steps | default(10) | toyaml }}
    batch_size: {{ t_batch | default(8) }}
    micro_batch_size: {{ t_micro | default(None) | toyaml }}
    seq_len: 32
    precision: !singleton:fgc.settings:PrecisionSettings
        mode: {{ t_precision | default("fp32") | toyaml }}
{% if t_class | default("DDPTrainer") == "DDPTrainer" %}
    parallel: !singleton:fgc.settings:DataParallelSettings
        nproc: {{ t_nproc | default(2) }}
{% endif %}
"""


def compile_error(cfg: Path, variables: dict) -> FgcError:
    with pytest.raises(FgcError) as info:
        compile_config(cfg, variables=variables)
    return info.value


def test_trainer_field_type_error_at_value_line(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_steps": "abc"})
    assert [(d.loc.file, d.loc.line, d.message) for d in exc.diagnostics] == [
        (str(cfg.resolve()), 8, "DDPTrainer.max_steps must be int (at least 1), got 'abc'")
    ]


def test_trainer_several_field_errors_together(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_steps": 1.5, "t_precision": "fp16"})
    assert [(d.loc.line, d.message) for d in exc.diagnostics] == [
        (8, "DDPTrainer.max_steps must be int (at least 1), got 1.5"),
        (13, "PrecisionSettings.mode must be one of 'fp32', 'bf16-mixed', 'bf16', 'fp16-mixed', got 'fp16'"),
    ]


def test_data_settings_field_type_checked(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        '-- extends "lm/train.yaml"\n[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n'
        "    data_dir: tokens\n    val_fraction: lots\n",
    )
    exc = compile_error(cfg, {})
    assert [(d.loc.file, d.loc.line, d.message) for d in exc.diagnostics] == [
        (str(cfg.resolve()), 5, "DataSettings.val_fraction must be float (0 or more and less than 1), got 'lots'")
    ]


def test_batch_size_not_divisible_by_nproc(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_batch": 6, "t_nproc": 4})
    assert [(d.loc.file, d.loc.line, d.message) for d in exc.diagnostics] == [
        (str(cfg.resolve()), 9, "batch_size 6 is not divisible by nproc 4")
    ]


def test_micro_batch_must_divide_per_rank_batch(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_batch": 8, "t_nproc": 2, "t_micro": 3})
    assert [(d.loc.line, d.message) for d in exc.diagnostics] == [
        (
            10,
            "the per-rank batch (4 = batch_size 8 / nproc 2) is not divisible by micro_batch_size 3",
        )
    ]


def test_micro_batch_size_zero_is_an_error(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_batch": 8, "t_micro": 0})
    assert [d.loc.line for d in exc.diagnostics] == [10]


def test_batch_size_must_be_positive(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    exc = compile_error(cfg, {"t_batch": 0})
    assert [(d.loc.line, d.message) for d in exc.diagnostics] == [
        (9, "batch_size must be at least 1, got 0")
    ]


def test_plan_basic(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    compiled = compile_config(
        cfg, variables={"t_class": "BasicTrainer", "t_batch": 6, "t_micro": 2}
    )
    assert compiled.ctx.plan == Plan(
        trainer_type="basic",
        nproc=1,
        launcher="python",
        global_batch_size=6,
        batch_per_rank=6,
        micro_batch_size=2,
        grad_accum_steps=3,
        seq_len=32,
        precision="fp32",
        kernels=compiled.ctx.plan.kernels,
    )
    assert compiled.ctx.plan.kernels["cross_entropy"]["impl"] == "torch"
    settings = compiled.ctx.settings
    assert type(settings) is BasicTrainer
    assert settings.data == DataSettings(data_dir="tokens")
    assert (settings.max_steps, settings.seed) == (10, 42)


def test_plan_ddp(tmp_path):
    cfg = write(tmp_path / "c.yaml", TRAINER)
    compiled = compile_config(cfg, variables={"t_batch": 16, "t_nproc": 4, "t_micro": 2})
    assert compiled.ctx.plan.to_data() == {
        "trainer_type": "ddp",
        "nproc": 4,
        "launcher": "torchrun",
        "global_batch_size": 16,
        "batch_per_rank": 4,
        "micro_batch_size": 2,
        "grad_accum_steps": 2,
        "seq_len": 32,
        "precision": "fp32",
        "fsdp_units": "none",
        "activation_checkpointing": "none",
        "compile": "none",
        "apply_order": [],
        "mesh": {"dp": 4},
        "tensor_parallel": None,
        "pipeline": None,
        "kernels": {
            "cross_entropy": {
                "impl": "torch",
                "reason": "auto: one micro-batch's logits take 0.1 MiB (under 256 MiB): the reference",
            },
        }
        | {
            name: {"impl": "torch", "reason": "auto: the torch code; the Triton kernels are opt-in, kernel_impl: triton"}
            for name in ("apply_rope", "rms_norm", "swiglu")
        },
    }
    assert type(compiled.ctx.settings) is DDPTrainer


def test_plan_orders_activation_checkpointing_before_compile(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        '-- extends "lm/train.yaml"\n[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n'
        "    data_dir: tokens\n",
    )
    plan = compile_config(cfg, variables={"compile": True, "activation_checkpointing": "full"}).ctx.plan
    assert (plan.activation_checkpointing, plan.compile) == ("every decoder layer", "per decoder layer")
    assert plan.apply_order == ("activation checkpointing", "compile")
    plan = compile_config(cfg, variables={"activation_checkpointing": "selective"}).ctx.plan
    assert plan.activation_checkpointing == "every decoder layer, selective: matmul and attention outputs kept"
    with pytest.raises(FgcError) as info:
        compile_config(cfg, variables={"activation_checkpointing": "some"})
    assert "ActivationCheckpointSettings.mode must be one of 'none', 'full', 'selective', got 'some'" in (
        info.value.diagnostics[0].message
    )


def test_plan_of_library_template_with_defines(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        '-- extends "lm/train.yaml"\n[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n'
        "    data_dir: tokens\n",
    )
    basic = compile_config(cfg).ctx.plan
    assert (basic.trainer_type, basic.nproc, basic.launcher) == ("basic", 1, "python")
    assert (basic.global_batch_size, basic.micro_batch_size, basic.seq_len) == (8, 8, 128)
    ddp = compile_config(
        cfg, variables={"trainer_type": "ddp", "nproc": 4, "batch_size": 32, "seq_len": 64}
    ).ctx.plan
    assert ddp == Plan("ddp", 4, "torchrun", 32, 8, 8, 1, 64, "fp32", mesh=(("dp", 4),), kernels=ddp.kernels)


def test_plan_of_the_main_example():
    example = REPO / "examples" / "tiny_llama" / "train.yaml"
    plan = compile_config(example, variables={"nproc": 2, "batch_size": 8}).ctx.plan
    assert plan == Plan("ddp", 2, "torchrun", 8, 4, 4, 1, 128, "fp32", mesh=(("dp", 2),), kernels=plan.kernels)
    plan = compile_config(example, variables={"trainer_type": "basic", "max_steps": 5}).ctx.plan
    assert plan == Plan("basic", 1, "python", 16, 16, 16, 1, 128, "fp32", kernels=plan.kernels)


def test_library_nproc_error_at_library_line(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        '-- extends "lm/train.yaml"\n[data]\n.data: &data !singleton:fgc.settings:DataSettings@data\n'
        "    data_dir: tokens\n",
    )
    exc = compile_error(cfg, {"trainer_type": "ddp", "nproc": 3})
    lib = (LIBRARY_DIR / "lm" / "train.yaml").read_text().split("\n")
    line = next(i for i, t in enumerate(lib, 1) if t.strip().startswith("batch_size:"))
    assert [(d.loc.file, d.loc.line, d.message) for d in exc.diagnostics] == [
        (LIB_TRAIN, line, "batch_size 8 is not divisible by nproc 3")
    ]


def test_missing_training_targets(tmp_path):
    cfg, ir, ctx = loaded(tmp_path, "model: !singleton:torch.nn:ReLU\n")
    PlanTraining().run(ir, ctx)
    assert diags(ctx) == [
        (str(cfg), None, "a training config needs the target(s) 'optimizer', 'trainer'")
    ]


def test_trainer_must_be_a_settings_class(tmp_path):
    cfg, ir, ctx = loaded(
        tmp_path,
        "model: !singleton:torch.nn:ReLU\noptimizer: !partial:torch.optim:SGD\n"
        "trainer: !singleton:builtins:dict\n",
    )
    run_passes(ir, ctx, ResolveCallables(), BindArguments(), PlanTraining())
    assert [(line, msg.split(",")[0]) for _, line, msg in diags(ctx)] == [
        (3, "'trainer' must be a trainer settings class")
    ]


# --- validate-model --------------------------------------------------------------------------


def _example_line(fragment: str) -> int:
    from pathlib import Path

    import fgc

    text = (Path(fgc.__file__).parent / "templates" / "lm" / "train.yaml").read_text().splitlines()
    return next(i for i, line in enumerate(text, 1) if fragment in line)


def test_heads_must_divide_hidden_size_and_kv_heads_divide_heads():
    from conftest import EXAMPLE

    with pytest.raises(FgcError) as info:
        compile_config(EXAMPLE, variables={"num_attention_heads": 5})
    d = info.value.diagnostics
    assert [x.loc.line for x in d] == [
        _example_line("num_attention_heads: {{"),
        _example_line("num_key_value_heads: {{"),
        _example_line("head_dim: {{ (ns.head_dim or"),
    ]
    assert d[0].message == "num_attention_heads (5) does not divide hidden_size (96)"
    assert d[1].message == "num_key_value_heads (2) does not divide num_attention_heads (5)"
    assert "set by -D num_attention_heads=5 at " in d[0].hint


def test_kv_heads_error_names_the_child_line_that_set_it():
    from conftest import EXAMPLE

    with pytest.raises(FgcError) as info:
        compile_config(EXAMPLE, variables={"num_key_value_heads": 3})
    [d] = info.value.diagnostics
    assert d.message == "num_key_value_heads (3) does not divide num_attention_heads (4)"
    example_line = next(
        i for i, l in enumerate(EXAMPLE.read_text().splitlines(), 1) if "ns.num_key_value_heads =" in l
    )
    assert d.hint.endswith(f"examples/tiny_llama/train.yaml:{example_line}")
