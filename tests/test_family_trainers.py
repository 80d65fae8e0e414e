"""Every registered family with the sharded trainers, from scratch in the main example.

The per-family files test each family's features against transformers; this one iterates the
registry, so a new family is covered without editing it. For each family, the main example
(`-D family=NAME`, 4 layers, untied head) trains 2 steps in one process (the reference), then
on 2 ranks with FSDP2 over a 2-way tensor-parallel mesh (the model built on the meta device,
each rank materialising its share) and with a 2-stage pipeline. The first step's loss is the
one-process loss (the weights are the same from the seed, whatever the layout), unless the model
draws dropout; every run is finite; the family claims the model, and its final/ export names
the first family that does (the family itself, or an earlier one the model is equivalent to). A family whose
model the pipeline cannot cut (a mixture of experts with its load-balancing loss on) is a build
error that says why.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import EXAMPLE, run_fgc
from family_checks import logged_losses as _losses
from family_checks import import_model, train
from fgc.build import compile_config
from fgc.families import FAMILIES, NAMES
from fgc_lowering.construct import meta_model

FLAGS = ["-D", "max_steps=2", "-D", "log_every=1", "-D", "eval_every=0", "-D", "batch_size=4", "-D", "seq_len=32",
         "-D", "num_hidden_layers=4", "-D", "tie_word_embeddings=false"]
TRAINERS = {
    "one process": ["-D", "trainer_type=basic"],
    "fsdp2 x tensor parallel": ["-D", "trainer_type=fsdp2", "-D", "tensor_degree=2", "-D", "nproc=2"],
    "pipeline": ["-D", "trainer_type=pipeline", "-D", "nproc=2"],
}


def _draws_dropout(model: torch.nn.Module) -> bool:
    """Whether MODEL (in training mode) draws random numbers: its layout then changes its losses."""
    return any(
        (isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "attention_dropout", 0.0) > 0
        for m in model.modules()
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_each_family_trains_alike_with_fsdp2_tensor_parallel_and_pipeline(tmp_path, family):
    losses = {}
    for trainer, flags in TRAINERS.items():
        pkg = tmp_path / trainer.replace(" ", "_")
        proc = run_fgc("build", EXAMPLE, "-o", pkg, "-D", f"family={family}", *FLAGS, *flags)
        if proc.returncode and trainer == "pipeline":
            # the one reason a family's model is not cut into stages: an auxiliary loss that pools
            # every layer's routing
            assert "cannot add: it pools the routing of every layer" in proc.stderr, proc.stderr
            assert not pkg.exists()
            continue
        assert proc.returncode == 0, proc.stderr
        if trainer != "one process":
            assert 'model = build_model(device="meta")' in (pkg / "train.py").read_text()
        run = tmp_path / f"run_{pkg.name}"
        result = train(pkg, "--output-dir", run, torchrun=trainer != "one process")
        assert result.returncode == 0, result.stderr[-3000:]
        losses[trainer] = _losses(run)
        assert len(losses[trainer]) == 2 and all(math.isfinite(x) for x in losses[trainer]), losses
        if trainer == "one process":
            dropout = _draws_dropout(import_model(pkg).build_model().train())
            # the family claims the model it builds (of fgc's parts, as the build sees it); the
            # export names the first family that does (Phi-3 with full rotary and no window is a
            # Llama, and exports as one)
            variables = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in FLAGS[1::2] + flags[1::2])}
            compiled = compile_config(EXAMPLE, variables={"family": family, **variables})
            model = meta_model(compiled.ir, compiled.ctx)
            claims = [name for name in NAMES if FAMILIES[name].export_fields(model, None) is not None]
            assert family in claims, claims
        config = json.loads((run / "final" / "config.json").read_text())
        assert config["architectures"] == [FAMILIES[claims[0]].architecture], (claims, config["architectures"])
    assert len(losses) >= 2
    if not dropout:
        reference = losses["one process"][0]
        for trainer, values in losses.items():
            assert values[0] == pytest.approx(reference, rel=1e-4), (trainer, losses)
