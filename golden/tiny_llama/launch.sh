#!/usr/bin/env bash
# Launch the trainer of `tiny_llama` as its plan says: DistributedDataParallel over 2 processes per node (torchrun).
# Usage: launch.sh [TORCHRUN ARGS, e.g. --nnodes 2 --rdzv-endpoint HOST:PORT] [-- TRAIN.PY ARGS]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
torchrun_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    torchrun_args+=("$1")
    shift
done
[ $# -gt 0 ] && shift
exec torchrun --nproc-per-node 2 "${torchrun_args[@]}" "$here/train.py" "$@"
