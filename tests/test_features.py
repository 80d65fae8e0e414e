"""The features of train.py (fgc/codegen/features.py): registered code that fills the skeleton's slots."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import jinja2
import pytest

from conftest import REPO
from fgc.codegen.features import FEATURES, SlotExtension, features_of
from fgc.codegen.package import TEMPLATES_DIR, _jinja

SLOT = re.compile(r"\{%-? *slot (\w+) *%\}(\{%-? *endslot)?")


def _slots() -> tuple[set[str], set[str]]:
    """Every slot of the skeleton and the feature templates, and those with a default (code a
    feature replaces)."""
    names, replaced = set(), set()
    sources = [TEMPLATES_DIR / "train.py.j2", *sorted((TEMPLATES_DIR / "features").glob("*.j2"))]
    for path in sources:
        for match in SLOT.finditer(path.read_text()):
            names.add(match.group(1))
            if match.group(2) is None:
                replaced.add(match.group(1))
    return names, replaced


def test_the_skeleton_has_no_feature_conditionals():
    skeleton = (TEMPLATES_DIR / "train.py.j2").read_text()
    assert re.findall(r"\{%-? *(?:if|elif)\b", skeleton) == []
    names, replaced = _slots()
    assert {"functions", "optimizer", "step_update", "forward_backward"} <= names
    assert {"optimizer", "step_update", "step_norm", "forward_backward", "forward_backward_doc"} == replaced


def test_every_feature_is_registered_and_fills_slots_that_exist():
    files = {p.name.removesuffix(".py.j2") for p in (TEMPLATES_DIR / "features").glob("*.j2")}
    assert files == {f.name for f in FEATURES}
    env = _jinja()
    names, _ = _slots()
    for feature in FEATURES:
        blocks = set(env.get_template(feature.template).blocks)
        assert blocks, feature.name
        assert blocks <= names, (feature.name, blocks - names)
    # and the installed package carries them
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"features/*.j2"' in pyproject


def _contexts():
    """Every combination of the facts the features are chosen by (those codegen can derive: the
    loss head and a pipeline make the model give its loss)."""
    for values in itertools.product([False, True], repeat=11):
        (flags, flag_bool, lm, pretrained, chunked, pipelined, masking, diloco, aux, oib, tp) = values
        yield {
            "config_flags": ["add_argument('--lr')"] if flags else [],
            "flag_bool": flag_bool and flags,
            "loss_fn": "lm_loss" if lm else "loss_sum_and_count",
            "pretrained": pretrained,
            "chunked_loss": chunked,
            "pipelined": pipelined,
            "model_gives_loss": chunked or pipelined,
            "document_masking": masking,
            "trainer_type": "diloco" if diloco else "ddp",
            "model_aux_loss": aux and not pipelined,
            "optimizer_in_backward": oib,
            "plan": SimpleNamespace(tensor_parallel={"rules": []} if tp else None),
            "sampling": pretrained,
        }


def test_no_two_features_replace_the_same_code_and_the_loss_is_always_computed():
    env = _jinja()
    _, replaced = _slots()
    blocks = {f.name: set(env.get_template(f.template).blocks) for f in FEATURES}
    for context in _contexts():
        chosen = features_of(context)
        for slot in replaced:
            fillers = [name for name in chosen if slot in blocks[name]]
            assert len(fillers) <= 1, (slot, fillers, context)
        for slot in ("evaluate_forward", "forward"):
            assert len([name for name in chosen if slot in blocks[name]]) == 1, (slot, chosen)


def _env(features: dict[str, str]) -> jinja2.Environment:
    templates = {f"features/{name}.py.j2": text for name, text in features.items()}
    templates["skeleton"] = "a\n{% slot extra %}{% endslot %}\n{% slot body %}\ndefault {{ x }}\n{% endslot %}\nz\n"
    return jinja2.Environment(
        loader=jinja2.DictLoader(templates),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        extensions=[SlotExtension],
    )


def test_a_slot_renders_its_features_blocks_in_order_or_its_default():
    env = _env(
        {
            "one": "{% block extra %}one {{ x }}\n{% endblock %}",
            "two": "{% block extra %}two\n{% endblock %}{% block body %}replaced\n{% endblock %}",
            "three": "{% block body %}again\n{% endblock %}",
        }
    )
    skeleton = env.get_template("skeleton")
    assert skeleton.render(features=[], x=1) == "a\ndefault 1\nz\n"
    assert skeleton.render(features=["one"], x=1) == "a\none 1\ndefault 1\nz\n"
    assert skeleton.render(features=["two", "one"], x=1) == "a\ntwo\none 1\nreplaced\nz\n"
    with pytest.raises(AssertionError, match="slot body"):
        skeleton.render(features=["two", "three"], x=1)
