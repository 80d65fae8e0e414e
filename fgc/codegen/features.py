"""The features of a generated ``train.py``: the code only some packages have, registered here.

``codegen_templates/train.py.j2`` is the skeleton every package runs, without a branch on what a
config uses. Where a feature adds or replaces code, the skeleton has a named slot::

    {% slot optimizer %}
    optimizer = optimizer_factory(...)    (the default: what a package without such a feature runs)
    {% endslot %}

A feature is one entry of :data:`FEATURES`: its name, when a package has it (a test of the
skeleton's render context, which codegen derives from the training program), and its template,
``codegen_templates/features/NAME.py.j2``, whose ``{% block SLOT %}`` s hold its code for each
slot it fills. A slot renders the blocks of that name of the package's features, in the order of
:data:`FEATURES`; where none has one, its default. A feature's block may hold slots of its own.

So a new feature is one entry here and one template beside the others; ``tests/test_features.py``
checks that every block fills a slot that exists, and that the features that replace the same
default never apply together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension


@dataclass(frozen=True)
class Feature:
    name: str  # its template: codegen_templates/features/<name>.py.j2
    applies: Callable[[Mapping], bool]  # on the skeleton's render context
    what: str  # for a reader of this list

    @property
    def template(self) -> str:
        return f"features/{self.name}.py.j2"


FEATURES: tuple[Feature, ...] = (
    Feature("config_flags", lambda c: bool(c["config_flags"]), "the config's own flags (its dynamic_args)"),
    Feature("flag_bool", lambda c: c["flag_bool"], "the argparse type of the config's bool flags"),
    Feature("lm_loss", lambda c: c["loss_fn"] == "lm_loss", "label smoothing, z-loss or soft-capping"),
    Feature("pretrained", lambda c: c["pretrained"], "weights from a Hugging Face model directory"),
    Feature("logits_loss", lambda c: not c["model_gives_loss"], "a model that gives logits"),
    Feature("model_loss", lambda c: c["model_gives_loss"], "a model that gives its loss: the loss head, a pipeline"),
    Feature("loss_head", lambda c: c["chunked_loss"], "the head and its loss in chunks (chunked, triton)"),
    Feature("pipeline", lambda c: c["pipelined"], "pipeline stages and their schedule"),
    Feature("document_masking", lambda c: c["document_masking"], "attention within each document"),
    Feature("diloco", lambda c: c["trainer_type"] == "diloco", "DiLoCo's workers and outer optimizer"),
    Feature("aux_loss", lambda c: c["model_aux_loss"], "a model's auxiliary loss (an MoE's balance)"),
    Feature("optimizer_in_backward", lambda c: c["optimizer_in_backward"], "the optimizer steps inside the backward"),
    Feature(
        "mesh_groups",
        lambda c: bool(c["plan"].tensor_parallel) and not c["optimizer_in_backward"],
        "the optimizer's groups split by device mesh (tensor parallelism)",
    ),
    Feature("sampling", lambda c: c["sampling"], "a text sample every SAMPLE_EVERY steps"),
)


def features_of(context: Mapping) -> list[str]:
    """The names of the features a package with this render context has, in registry order."""
    return [f.name for f in FEATURES if f.applies(context)]


class SlotExtension(Extension):
    """``{% slot NAME %}default{% endslot %}``: the blocks NAME of the context's ``features``,
    or the default where none has one."""

    tags = {"slot"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        name = parser.stream.expect("name").value
        body = parser.parse_statements(("name:endslot",), drop_needle=True)
        call = self.call_method("_fill", [nodes.ContextReference(), nodes.Const(name)])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _fill(self, context: jinja2.runtime.Context, name: str, caller: Callable[[], str]) -> str:
        parts = []
        for feature in context["features"]:
            template = self.environment.get_template(f"features/{feature}.py.j2")
            block = template.blocks.get(name)
            if block is not None:
                parts.append("".join(block(template.new_context(context.get_all()))))
        default = caller()
        if len(parts) > 1 and default.strip():
            # a default is replaced by one feature's code, never by two
            raise AssertionError(f"slot {name}: features {context['features']} replace its default together")
        return "".join(parts) if parts else default
