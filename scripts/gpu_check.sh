#!/usr/bin/env bash
# The GPU check: one short script for the minutes a CUDA GPU is at hand (docs/development.md#on-a-gpu).
#
#   bash scripts/gpu_check.sh prepare [--shape tiny]  # here, where fgc is installed: builds .gpu/packages
#   bash scripts/gpu_check.sh run OUT        # on the GPU machine (torch, triton, transformers; no fgc)
#
# `prepare` passes its options to benchmarks/gpu_train.py prepare (--shape, --variants);
# GPU_CHECK_KERNELS=LIST in run's environment limits benchmarks/kernels.py to those kernels.
#
# `run` writes into OUT: env.txt (GPU, driver, versions), kernels.txt and kernels.csv
# (benchmarks/kernels.py: (a) the Triton kernels compiled and checked against their torch twins,
# any WRONG row is a failure, (b) their times), train.txt and train.csv (benchmarks/gpu_train.py:
# (c) the main example scaled to ~100M parameters in bf16, tokens/s and MFU against a transformers
# loop). Each step has its own time limit so that one that hangs leaves time for the others; the
# script's status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    # fgc's build replaces only what an earlier build wrote; benchmark.json names this prepare's variants
    mkdir -p .gpu
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    shift
    exec python benchmarks/gpu_train.py prepare .gpu/packages "$@"
    ;;
run)
    out="${2:?usage: gpu_check.sh run OUT}"
    ;;
*)
    echo "usage: gpu_check.sh prepare | run OUT" >&2
    exit 2
    ;;
esac

mkdir -p "$out"
export PYTHONUNBUFFERED=1
# fgc_runtime is the runtime/ folder, importable without installing fgc
site="$(mktemp -d)"
ln -s "$PWD/runtime" "$site/fgc_runtime"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() { # step NAME SECONDS COMMAND...: runs COMMAND, its output into OUT/NAME.txt and the console
    local name="$1" seconds="$2"
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    local rc="${PIPESTATUS[0]}"
    echo "== $name: exit $rc"
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status="$rc"; fi
}

step env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())"'
step kernels 200 python3 benchmarks/kernels.py --kernels "${GPU_CHECK_KERNELS:-cross_entropy,rms_norm,swiglu,rope}" --rep-ms 50 --csv "$out/kernels.csv"
step loss 120 python3 benchmarks/loss.py --device cuda --max-gib 100 --csv "$out/loss.csv"
step train 200 python3 benchmarks/gpu_train.py run .gpu/packages --csv "$out/train.csv"
exit "$status"
