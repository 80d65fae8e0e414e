"""The generated train.py imports exactly what it uses: its skeleton's imports come from the names
the rendered text reads (fgc/codegen/imports.py). pyflakes, an independent reader, finds no
undefined name and no unused import in the packages of many configs."""

from __future__ import annotations

import pyflakes.api
import pyflakes.reporter
import pytest

from conftest import EXAMPLE, run_fgc

CONFIGS = {
    "basic": ["-D", "trainer_type=basic"],
    "ddp": [],
    "ddp-no-clip": ["-D", "grad_clip=null"],
    "ddp-x-tp": ["-D", "tensor_degree=2", "-D", "nproc=4"],
    "fsdp2": ["-D", "trainer_type=fsdp2", "-D", "activation_checkpointing=full", "-D", "compile=true"],
    "fsdp2-x-tp": ["-D", "trainer_type=fsdp2", "-D", "tensor_degree=2", "-D", "nproc=4"],
    "hsdp": ["-D", "trainer_type=fsdp2", "-D", "replicate_degree=2", "-D", "nproc=4"],
    "pipeline": ["-D", "trainer_type=pipeline"],
    "pipeline-zbv": ["-D", "trainer_type=pipeline", "-D", "pipeline_schedule=zbv-zero-bubble", "-D", "num_hidden_layers=4"],
    "pipeline-x-tp": ["-D", "trainer_type=pipeline", "-D", "tensor_degree=2", "-D", "nproc=4"],
    "fsdp2-x-pp": ["-D", "trainer_type=fsdp2", "-D", "pipeline_degree=2", "-D", "nproc=4"],
    "diloco": ["-D", "trainer_type=diloco"],
    "fp16": ["-D", "trainer_type=basic", "-D", "precision=fp16-mixed"],
    "in-backward": ["-D", "trainer_type=basic", "-D", "optimizer_in_backward=true", "-D", "grad_clip=null"],
    "samples": ["-D", "sample_every=5", "-D", "document_masking=true"],
    "chunked": ["-D", "loss_impl=chunked"],
    "triton": ["-D", "kernel_impl=triton"],
    "mixtral": ["-D", "family=mixtral"],
}


@pytest.mark.parametrize("flags", CONFIGS.values(), ids=CONFIGS.keys())
def test_train_py_imports_what_it_uses_and_nothing_else(tmp_path, flags):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "--no-smoke", *flags, check=True)
    source = (out / "train.py").read_text()
    found: list[str] = []

    class Collect(pyflakes.reporter.Reporter):
        def __init__(self):
            super().__init__(None, None)

        def flake(self, message):
            found.append(str(message))

        def syntaxError(self, *args):
            found.append(f"syntax error: {args}")

        def unexpectedError(self, *args):
            found.append(f"unexpected: {args}")

    pyflakes.api.check(source, "train.py", Collect())
    assert found == []
