"""The model's kernel implementations from the config (-D kernel_impl): the select-kernels pass,
the generated code, the build-time and run-time errors, and a training run on fgc_runtime's Triton
kernels (in Triton's interpreter on this CPU; tests/conftest.py sets TRITON_INTERPRET=1) that
matches the torch code's losses."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys

import pytest

from fgc.codegen.package import format_python

from conftest import REPO, line_of, run_fgc, small_config

LIB_TRAIN = "fgc/templates/lm/train.yaml"
MODEL_KERNELS = ("apply_rope", "rms_norm", "swiglu")


def build(tmp_path, name, *defines):
    out = tmp_path / name
    proc = run_fgc("build", small_config(tmp_path), "-o", out, "-D", "trainer_type=basic", *defines)
    assert proc.returncode == 0, proc.stderr
    return out


def test_default_runs_the_torch_code_and_triton_is_chosen_per_config(tmp_path):
    torch_pkg = build(tmp_path, "torch")
    triton_pkg = build(tmp_path, "triton", "-D", "kernel_impl=triton")
    kernels = json.loads((torch_pkg / "manifest.json").read_text())["plan"]["kernels"]
    for name in MODEL_KERNELS:
        assert kernels[name] == {
            "impl": "torch",
            "reason": "auto: the torch code; the Triton kernels are opt-in, kernel_impl: triton",
        }
    kernels = json.loads((triton_pkg / "manifest.json").read_text())["plan"]["kernels"]
    for name in MODEL_KERNELS:
        assert kernels[name] == {"impl": "triton", "reason": "chosen in the config, kernel_impl"}
    # model.py: the three partials that build the attention, the MLP and the norms pass
    # kernel_impl; nothing else differs
    triton_model = (triton_pkg / "model.py").read_text()
    assert triton_model.count('kernel_impl="triton"') == 3
    stripped = re.sub(r',\s*kernel_impl="triton",?', "", triton_model)
    assert format_python(stripped) == (torch_pkg / "model.py").read_text()
    # train.py checks the plan's kernels against the device before anything else (the runtime's
    # check_kernel_devices, which passes a plan without Triton kernels): the two train.py differ
    # only in the plan's record of the kernels (and the config's hash)
    check = 'check_kernel_devices(PLAN["kernels"], dist.device)'
    torch_train, triton_train = ((p / "train.py").read_text().splitlines() for p in (torch_pkg, triton_pkg))
    assert check in "\n".join(torch_train) and check in "\n".join(triton_train)
    changed = [line[2:].strip() for line in difflib.ndiff(torch_train, triton_train) if line[:2] in ("- ", "+ ")]
    kernel_keys = tuple(f'"{name}": {{' for name in MODEL_KERNELS)
    assert changed and all(
        line.startswith(('"impl":', '"reason":', "},", "CONFIG_HASH =", *kernel_keys)) for line in changed
    ), changed


def test_explain_shows_the_model_kernels(tmp_path):
    proc = run_fgc("explain", small_config(tmp_path), "-D", "kernel_impl=triton")
    assert proc.returncode == 0, proc.stderr
    for name in MODEL_KERNELS:
        assert f"  kernel {name}: triton (chosen in the config, kernel_impl)" in proc.stdout


@pytest.mark.parametrize(
    "defines, message",
    [
        (
            ["-D", "kernel_impl=triton", "-D", "compile=true"],
            "error: kernel_impl triton with compile: torch.compile generates its own fused kernels",
        ),
        (["-D", "kernel_impl=cuda"], "error: RMSNorm.kernel_impl must be one of 'auto', 'torch', 'triton', got 'cuda'"),
    ],
)
def test_build_errors_point_at_the_kernel_impl_line(tmp_path, defines, message):
    out = tmp_path / "out"
    proc = run_fgc("build", small_config(tmp_path), "-o", out, *defines)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{LIB_TRAIN}:")
    assert "-D kernel_impl=" in proc.stderr  # the hint names the -D that set it
    assert not out.exists()


def test_triton_on_a_cpu_device_is_a_build_error(tmp_path):
    cfg = small_config(tmp_path, extra="[trainer]\n== super()\n    device: cpu\n")
    proc = run_fgc("build", cfg, "-o", tmp_path / "out", "-D", "kernel_impl=triton")
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{LIB_TRAIN}:{line_of(REPO / LIB_TRAIN, 'kernel_impl: {{')}: error: kernel_impl triton: "
        "fgc's Triton kernels run on CUDA, and this config's device is cpu"
    ) in proc.stderr


def run_train(package, env_extra, *flags):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "train.py", "--output-dir", str(package / "out"), "--resume", "never", *flags],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
    )


def losses(package):
    records = [json.loads(line) for line in (package / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_training_on_the_triton_kernels_matches_the_torch_code(tmp_path):
    small = ["-D", "seq_len=16", "-D", "batch_size=2", "-D", "max_steps=3", "-D", "log_every=1"]
    torch_pkg = build(tmp_path, "torch", *small)
    triton_pkg = build(tmp_path, "triton", "-D", "kernel_impl=triton", *small)
    ran = run_train(torch_pkg, {}, "--device", "cpu")
    assert ran.returncode == 0, ran.stderr
    ran = run_train(triton_pkg, {"TRITON_INTERPRET": "1"}, "--device", "cpu")
    assert ran.returncode == 0, ran.stderr
    reference, got = losses(torch_pkg), losses(triton_pkg)
    assert len(reference) == len(got) == 3
    # fp32 on both sides; the kernels' reductions differ in order from torch's, nothing else
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert reference[0] != reference[-1]  # it trained

    # Outside the interpreter, a CPU run of this package stops before the first step.
    ran = run_train(triton_pkg, {"TRITON_INTERPRET": "0"}, "--device", "cpu")
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1] == (
        "error: the package's Triton kernels (apply_rope, rms_norm, swiglu; rebuild with -D kernel_impl=auto and "
        "-D loss_impl=auto to run the torch code): "
        "impl='triton' runs on CUDA tensors, got cpu ones (TRITON_INTERPRET=1 runs the kernels on the CPU "
        "in Triton's interpreter, slowly: for tests); use impl='torch' or 'auto'"
    )
    assert "Traceback" not in ran.stderr


def test_remote_code_of_a_triton_model_runs_the_torch_twins(tmp_path):
    """Hugging Face remote code carries the kernels' torch twins only (flat files): a model built
    with kernel_impl triton is written to use them there."""
    from fgc_runtime.hf import _write_remote_code

    package = build(tmp_path, "triton", "-D", "kernel_impl=triton")
    out = tmp_path / "remote"
    out.mkdir()
    _write_remote_code(out, package)
    model_src = (out / "fgc_model.py").read_text()
    assert 'kernel_impl="triton"' not in model_src
    assert model_src.count('kernel_impl="auto"') == 3
    assert "from .fgc_kernels import rms_norm" in model_src
    kernels_src = (out / "fgc_kernels.py").read_text()
    assert "def rms_norm_torch(" in kernels_src
    assert "import triton" not in kernels_src and "from .triton" not in kernels_src
