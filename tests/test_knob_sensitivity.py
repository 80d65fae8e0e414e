"""No silent knobs (issue #21): every knob of lm/train.yaml and of the family templates, set to a
valid value other than its default, either changes the training program or is refused with a
one-line error (for a knob another setting makes irrelevant: "NAME has no effect with ...").

The knobs are read from the templates themselves (their ``-- set ns.X = X | default(...)`` lines),
so a knob added to a template is covered without editing this file. "The training program" is
what lowering decides (``Program.dump()``'s settings and plan) together with the generated
model.py and train.py, comment lines left out: a knob that changes only a comment or a provenance
line is silent. Builds run in this process (a build writes nothing to disk).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, line_of, run_fgc
from fgc.build import compile_config
from fgc.errors import FgcError
from fgc.families import FAMILIES

LM_TRAIN = REPO / "fgc" / "templates" / "lm" / "train.yaml"
KNOB_RE = re.compile(r"^-- set ns\.(\w+) = (\w+) \| default\(")
SECTION_RE = re.compile(r"^\[(\w+)\]\s*$")

# Values for knobs whose valid values are constrained (a default + 1 or x 2 would be refused for
# being invalid, not for being irrelevant): knob -> f(default, every knob's value) giving a value,
# or (value, the other -D it needs). With a pair, the knob's value is compared with a build that
# has only the other -D.
OVERRIDES = {
    "hidden_size": lambda d, v: d * 2,
    "num_attention_heads": lambda d, v: d * 2,
    "num_key_value_heads": lambda d, v: 1,
    "head_dim": lambda d, v: 16,
    "batch_size": lambda d, v: d * 2,
    "nproc": lambda d, v: (4, {"trainer_type": "ddp"}),
    "micro_batch_size": lambda d, v: 2,
    "rope_scaling": lambda d, v: {"rope_type": "linear", "factor": 2.0},
    "init_rules": lambda d, v: [["embed", 0.5]],
    "momentum": lambda d, v: 0.5,
    "min_lr_ratio": lambda d, v: 0.1,
    "lr_cooldown": lambda d, v: 10,
    "lr_anneal": lambda d, v: 10,
    "stages_per_rank": lambda d, v: 2,
    "microbatches": lambda d, v: 4,
    "data_dir": lambda d, v: "other_shards",
    "bf16_stochastic_round": lambda d, v: (True, {"precision": "bf16"}),
    "optimizer_in_backward": lambda d, v: (True, {"trainer_type": "basic", "grad_clip": None}),
    "pipeline_degree": lambda d, v: 2,
    "data_degree": lambda d, v: 2,
    "tensor_degree": lambda d, v: 2,
    "replicate_degree": lambda d, v: 2,
    "diloco_outer_momentum": lambda d, v: 0.5,
    "diloco_workers": lambda d, v: 1,
    "warmup_steps": lambda d, v: d + 1,
    "loss_chunk_budget_mib": lambda d, v: (16, {"loss_impl": "chunked", "trainer_type": "basic"}),
    # the families' own knobs that default to none (taken from transformers' config fields)
    "sliding_window": lambda d, v: 8,
    "query_pre_attn_scalar": lambda d, v: 64,
    "attn_logit_softcapping": lambda d, v: 20.0,
    "final_logit_softcapping": lambda d, v: 20.0,
    "attention_multiplier": lambda d, v: 0.5,
    "attention_dropout": lambda d, v: 0.1,
    "partial_rotary_factor": lambda d, v: 0.5,
    "max_window_layers": lambda d, v: 1,
    "no_rope_layer_interval": lambda d, v: 2,
    "moe_intermediate_size": lambda d, v: 64,
    "no_rope_layers": lambda d, v: [1, 0, 1, 1],
    "mlp_only_layers": lambda d, v: [0],
    # one layer of the other kind; qwen2 and smollm3 have sliding layers only with a window
    # (use_sliding_window, a sliding_window and, in qwen2, max_window_layers below the depth)
    "layer_types": lambda d, v: (
        d[:-1] + ["full_attention" if d[-1] == "sliding_attention" else "sliding_attention"]
        if d
        else (
            ["sliding_attention"] + ["full_attention"] * (v["num_hidden_layers"] - 1),
            {"use_sliding_window": True, "sliding_window": 8, **({"max_window_layers": 1} if "max_window_layers" in v else {})},
        )
    ),
}
# A string knob's allowed values: the first one that is not the default is used.
CHOICES = {
    "optimizer": ["adamw", "sgd"],
    "lr_scheduler": ["cosine", "wsd"],
    "budget_unit": ["steps", "tokens"],
    "lr_decay_shape": ["1-sqrt", "linear"],
    "trainer_type": ["ddp", "fsdp2"],
    "pipeline_schedule": ["1f1b", "gpipe"],
    "precision": ["fp32", "bf16"],
    "activation_checkpointing": ["none", "full"],
    "loss_impl": ["auto", "chunked"],
    "kernel_impl": ["auto", "torch"],
    "hidden_act": ["gelu_pytorch_tanh", "gelu"],  # gemma 2 and 3: gelu is the exact GELU
}


def knobs_of(path: Path) -> list[str]:
    """The knobs a template defines: the X of each ``-- set ns.X = X | default(...)`` line."""
    found = []
    for line in path.read_text().splitlines():
        m = KNOB_RE.match(line)
        if m and m.group(1) == m.group(2) and m.group(1) not in found:
            found.append(m.group(1))
    return found


def sections(path: Path) -> dict[str, list[str]]:
    """A template's ``[name]`` blocks: name -> its lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = SECTION_RE.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    return out


def family_chain(name: str) -> list[Path]:
    """The family's template and the family templates it extends (lm/train.yaml left out)."""
    chain = []
    path = FAMILIES[name].template
    while True:
        chain.append(path)
        m = re.search(r'^-- extends "lm/(\w+)\.yaml"', path.read_text(), re.M)
        if m is None or m.group(1) == "train":
            return chain
        path = FAMILIES[m.group(1)].template


def family_knobs(name: str) -> list[str]:
    """The knobs that can act differently in family NAME: those its templates set, and those
    lm/train.yaml reads in a block that the family replaces (without ``== super()``)."""
    knobs = [k for path in family_chain(name) for k in knobs_of(path)]
    lm_blocks = sections(LM_TRAIN)
    for path in family_chain(name):
        for block, lines in sections(path).items():
            if block in lm_blocks and not any(l.strip() == "== super()" for l in lines):
                read = re.findall(r"\bns\.(\w+)", "\n".join(lm_blocks[block]))
                knobs += [k for k in read if k in knobs_of(LM_TRAIN)]
    return list(dict.fromkeys(knobs))


@contextmanager
def capture_namespace():
    """Yields a list that receives every ``namespace()`` a render makes (to read knob values)."""
    import fgc.frontend.environment as environment

    made: list = []
    original = environment.TrackedNamespace.__init__

    def init(*args, **kwargs):
        original(*args, **kwargs)
        made.append(args[0])

    environment.TrackedNamespace.__init__ = init
    try:
        yield made
    finally:
        environment.TrackedNamespace.__init__ = original


def _code(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not line.strip().startswith("#"))


def program(config: Path, variables: dict) -> tuple[str, str, str] | FgcError:
    """(Program.dump()'s settings and plan, model.py, train.py without comment lines), or the
    FgcError the build raises."""
    from fgc.codegen.package import PackageBuilder

    try:
        compiled = compile_config(config, variables=variables)
    except FgcError as exc:
        return exc
    data = compiled.ctx.program().to_data()
    builder = PackageBuilder(compiled.program)
    common = builder.common()
    return (
        json.dumps({"settings": data["settings"], "plan": data["plan"]}, sort_keys=True, default=str),
        _code(builder.model_py(common)),
        _code(builder.train_py(common, "0" * 64)),
    )


def knob_values(config: Path, base: dict) -> dict:
    """Every knob's final value in the default build of CONFIG."""
    with capture_namespace() as made:
        compile_config(config, variables=base)
    return dict(made[0]._Namespace__attrs)


def other_value(knob: str, default, values: dict):
    """A valid value of KNOB other than DEFAULT (VALUES: every knob's): (value, the other -D it needs)."""
    if knob in OVERRIDES:
        value = OVERRIDES[knob](default, values)
        return value if isinstance(value, tuple) else (value, {})
    if knob in CHOICES:
        return next(c for c in CHOICES[knob] if c != default), {}
    if isinstance(default, bool):
        return not default, {}
    if isinstance(default, int):
        return default + 1, {}
    if isinstance(default, float):
        return default * 2 if default else 0.5, {}
    if isinstance(default, list) and list(reversed(default)) != default:
        return list(reversed(default)), {}
    if isinstance(default, str):
        return default + "_other", {}
    raise AssertionError(f"no valid non-default value known for knob {knob} (default {default!r}): add it to OVERRIDES")


ONE_LINE_ERROR = re.compile(r"^(<command line>|\S+:\d+): error: ")


def silent_knobs(config: Path, knobs: list[str], base: dict) -> list[str]:
    """The knobs of KNOBS that, set to another valid value, neither change CONFIG's program nor
    are refused with a one-line "has no effect" error; each with what happened."""
    values = knob_values(config, base)
    defaults = {(): program(config, base)}
    assert not isinstance(defaults[()], FgcError), defaults[()]
    problems = []
    for knob in knobs:
        value, needs = other_value(knob, values.get(knob), values)
        key = tuple(sorted(needs.items()))
        if key not in defaults:
            defaults[key] = program(config, {**base, **needs})
        reference = defaults[key]
        assert not isinstance(reference, FgcError), (knob, needs, reference)
        built = program(config, {**base, **needs, knob: value})
        if isinstance(built, FgcError):
            first = built.diagnostics[0].format().splitlines()
            if len(built.diagnostics) != 1 or not ONE_LINE_ERROR.match(first[0]):
                problems.append(f"{knob}={value!r}: refused, but not with one error line: {built}")
        elif built == reference:
            problems.append(f"{knob}={value!r}: SILENT (the program is the same as with {values.get(knob)!r})")
    return problems


def test_knobs_are_read_from_the_templates():
    lm = knobs_of(LM_TRAIN)
    assert {"hidden_size", "lr", "trainer_type", "pipeline_degree", "data_dir", "diloco_inner_steps"} <= set(lm)
    assert "sliding_window" in family_knobs("mistral")
    # gemma replaces lm/train.yaml's [mlp]: the knobs that block read are the family's to check
    assert "mlp_bias" in family_knobs("gemma")


@pytest.mark.slow
def test_every_lm_train_knob_changes_the_program_or_is_refused():
    problems = silent_knobs(EXAMPLE, knobs_of(LM_TRAIN), {})
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_knob_changes_the_program_or_is_refused(family):
    problems = silent_knobs(FAMILIES[family].template, family_knobs(family), {"data_dir": "data"})
    assert not problems, "\n".join(problems)


# -- the errors as a user sees them -----------------------------------------------------------


@pytest.mark.parametrize(
    "define, message",
    [
        ("pipeline_schedule=gpipe", "-D pipeline_schedule: pipeline_schedule has no effect with trainer_type ddp"),
        ("diloco_inner_steps=5", "-D diloco_inner_steps: diloco_inner_steps has no effect with trainer_type ddp"),
        ("lr_decay_shape=linear", "-D lr_decay_shape: lr_decay_shape has no effect with lr_scheduler cosine"),
        ("lr_cooldown=10", "-D lr_cooldown: lr_cooldown has no effect with lr_scheduler cosine"),
        ("momentum=0.5", "-D momentum: momentum has no effect with optimizer adamw"),
        ("max_tokens=1000", "-D max_tokens: max_tokens has no effect with budget_unit steps"),
        ("pipeline_degree=2", "-D pipeline_degree: pipeline_degree has no effect with trainer_type ddp"),
        ("data_dir=shards", "-D data_dir: data_dir has no effect: the [data] block at examples/tiny_llama/train.yaml:"),
    ],
)
def test_a_define_without_effect_is_one_error_line_at_the_command_line(define, message):
    proc = run_fgc("check", EXAMPLE, "-D", define)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[0].startswith(f"<command line>: error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_define_equal_to_the_default_is_no_error():
    proc = run_fgc("check", EXAMPLE, "-D", "pipeline_schedule=1f1b", "-D", "lr_decay_fraction=0.2",
                   "-D", "diloco_outer_lr=0.7")
    assert proc.returncode == 0, proc.stderr


def test_the_data_dir_example_names_both_blocks():
    proc = run_fgc("check", EXAMPLE, "-D", "data_dir=shards")
    line = proc.stderr.splitlines()[0]
    data_line = line_of(EXAMPLE, "[data]")
    reads = line_of(LM_TRAIN, "data_dir: {{ ns.data_dir")
    assert line.endswith(
        f"the [data] block at examples/tiny_llama/train.yaml:{data_line} replaces the one that reads it "
        f"(fgc/templates/lm/train.yaml:{reads})"
    ), line


def test_a_knob_set_in_a_config_without_effect_is_an_error_at_that_line(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        '-- extends "train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.pipeline_schedule = 'gpipe'\n"
    )
    proc = run_fgc("check", config, "-I", EXAMPLE.parent)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"{config}:4: error: pipeline_schedule has no effect with trainer_type ddp: "
        "it sets the pipeline trainer's schedule"
    ), proc.stderr


def test_a_set_in_a_config_that_never_reaches_the_program_is_a_warning_naming_both_lines(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        '-- extends "train.yaml"\n'
        "[config_metadata]\n"
        "== super()\n"
        "-- set ns.data_dir = 'shards'\n"
    )
    proc = run_fgc("check", config, "-I", EXAMPLE.parent)
    assert proc.returncode == 0, proc.stderr
    warning = next(l for l in proc.stderr.splitlines() if ": warning:" in l)
    assert warning.startswith(f"{config}:4: warning: ns.data_dir set here has no effect: the [data] block at "
                              f"examples/tiny_llama/train.yaml:{line_of(EXAMPLE, '[data]')} replaces"), warning


def test_a_define_whose_value_a_later_set_replaces_unread_is_an_error():
    # rope_scaling's own rope_theta (transformers 5's rope_parameters) replaces the knob's value
    proc = run_fgc("check", EXAMPLE, "-D", "rope_scaling={rope_type: linear, factor: 2.0, rope_theta: 5.0}",
                   "-D", "rope_theta=7.0")
    assert proc.returncode == 2, proc.stderr
    again = line_of(LM_TRAIN, "-- set ns.rope_theta = ns.rope_scaling.rope_theta")
    assert proc.stderr.splitlines() == [
        f"<command line>: error: -D rope_theta: rope_theta has no effect: fgc/templates/lm/train.yaml:{again} "
        "sets ns.rope_theta again before any line reads it"
    ], proc.stderr


def test_an_override_that_a_child_config_overrides_again_is_a_warning_naming_both_lines(tmp_path):
    # train.yaml overrides the library's default; a child of it overrides train.yaml's value
    # before any line reads it: train.yaml's line never reaches the program
    child = tmp_path / "child.yaml"
    child.write_text('-- extends "train.yaml"\n[config_metadata]\n== super()\n-- set ns.hidden_size = 48\n')
    proc = run_fgc("check", child, "-I", EXAMPLE.parent)
    assert proc.returncode == 0, proc.stderr
    line = line_of(EXAMPLE, "-- set ns.hidden_size")
    assert (
        f"examples/tiny_llama/train.yaml:{line}: warning: ns.hidden_size set here has no effect: "
        f"{child}:4 sets it again before any line reads it"
    ) in proc.stderr.splitlines(), proc.stderr
    # the example itself (only overriding the library's defaults) warns about nothing
    plain = run_fgc("check", EXAMPLE)
    assert plain.returncode == 0 and "warning" not in plain.stderr, plain.stderr


def test_a_key_override_that_a_child_overrides_again_is_a_warning_naming_both_lines(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: !singleton:torch.nn:Linear [2, 2]\n"
        "trainer: !singleton:fgc.settings:BasicTrainer\n"
        "    data: !singleton:fgc.settings:DataSettings\n"
        "        data_dir: shards\n"
        "[opt]\n"
        "optimizer: !partial:torch.optim:SGD\n"
        "    lr: 1.0\n"
    )
    (tmp_path / "mid.yaml").write_text('-- extends "base.yaml"\n[opt]\n== super()\n    lr: 2.0\n')
    (tmp_path / "child.yaml").write_text('-- extends "mid.yaml"\n[opt]\n== super()\n    lr: 3.0\n')
    proc = run_fgc("explain", "child.yaml", "optimizer.lr", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        "mid.yaml:4: warning: optimizer.lr set here has no effect: child.yaml:4 sets it again"
    ), proc.stderr
    # overriding the first declaration (the default) is what a child is for: no warning
    assert "warning" not in run_fgc("explain", "mid.yaml", "optimizer.lr", cwd=tmp_path).stderr
