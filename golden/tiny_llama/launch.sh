#!/usr/bin/env bash
# Launch the trainer of `tiny_llama` as its plan says: DistributedDataParallel over 2 processes per node (torchrun).
# Usage: launch.sh [--devices 0,1,3] [--dry-run] [TORCHRUN ARGS] [-- TRAIN.PY ARGS]
#   --devices LIST     the GPUs to use (CUDA_VISIBLE_DEVICES), one process each; default 2 processes
#   --dry-run          print the torchrun command and exit
#   multi-node:        --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--rdzv-id ID] [--rdzv-backend B]
#                      (the rendezvous backend is c10d unless given)
# Other arguments before `--` go to torchrun as they are (e.g. --shutdown-timeout 120).
# A SIGTERM or a Ctrl-C (SIGINT) to this script goes to the trainer processes, once each: they
# save at the next step boundary and exit 0. A second Ctrl-C stops them at once, saving nothing,
# and this script exits 130. (A signal to torchrun itself makes it exit 1 even after a clean stop.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
    echo "launch.sh: error: $*" >&2
    exit 2
}

usage() {
    cat <<'USAGE'
Usage: launch.sh [--devices 0,1,3] [--dry-run] [TORCHRUN ARGS] [-- TRAIN.PY ARGS]
  --devices LIST     the GPUs to use (CUDA_VISIBLE_DEVICES), one process each
  --nproc-per-node N processes on this node (default: the plan's, below)
  --dry-run          print the torchrun command and exit
  multi-node:        --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--rdzv-id ID] [--rdzv-backend B]
                     (the rendezvous backend is c10d unless given)
Other arguments before `--` go to torchrun as they are; those after it go to train.py
(`launch.sh -- --help` lists them).
USAGE
    echo "This package's plan:" 2 "processes."
}

nproc=2

nnodes=1
devices=""
dry_run=false
rdzv_endpoint=""
rdzv_backend=""
torchrun_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; # --flag=value: read as --flag value
    esac
    case "$1" in
        --devices | --nproc-per-node | --nproc_per_node | --nnodes | --node-rank | --node_rank | \
            --rdzv-endpoint | --rdzv_endpoint | --rdzv-id | --rdzv_id | --rdzv-backend | --rdzv_backend)
            [ $# -ge 2 ] && [ "$2" != "--" ] || die "$1 needs a value"
            ;;
    esac
    case "$1" in
        -h | --help) usage && exit 0 ;;
        --devices) devices="$2" && shift ;;
        --nproc-per-node | --nproc_per_node) nproc="$2" && shift ;;
        --dry-run) dry_run=true ;;
        --nnodes) nnodes="$2" && torchrun_args+=("$1" "$2") && shift ;;
        --rdzv-endpoint | --rdzv_endpoint) rdzv_endpoint="$2" && torchrun_args+=("$1" "$2") && shift ;;
        --rdzv-backend | --rdzv_backend) rdzv_backend="$2" && torchrun_args+=("$1" "$2") && shift ;;
        --node-rank | --node_rank | --rdzv-id | --rdzv_id) torchrun_args+=("$1" "$2") && shift ;;
        *) torchrun_args+=("$1") ;;
    esac
    shift
done
[ $# -gt 0 ] && shift # the "--"

if [ -n "$devices" ]; then
    [[ "$devices" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--devices $devices: expected GPU indices separated by commas, e.g. 0,1,3"
    export CUDA_VISIBLE_DEVICES="$devices"
    IFS=, read -ra device_list <<<"$devices"
    nproc=${#device_list[@]}
fi
if [ "$nnodes" != 1 ]; then
    [ -n "$rdzv_endpoint" ] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (an address of the first node that every node can reach)"
    [ -n "$rdzv_backend" ] || torchrun_args+=(--rdzv-backend c10d)
fi
command=(torchrun --nproc-per-node "$nproc" "${torchrun_args[@]}" "$here/train.py" "$@")

if $dry_run; then
    printf -v line "%q " "${command[@]}"
    echo "${devices:+CUDA_VISIBLE_DEVICES=$devices }${line% }"
    exit 0
fi
# torchrun runs in a process group of its own (job control, `set -m`), so that a Ctrl-C at the
# terminal reaches this script alone, which passes it on once: torchrun would pass on its own
# copy too, and the trainers would take the two as a second Ctrl-C.
set -m
"${command[@]}" &
torchrun_pid=$!
set +m
interrupts=0
# torchrun's children are the trainer processes; without pkill, torchrun forwards the signal itself
forward() { pkill "-$1" -P "$torchrun_pid" 2>/dev/null || kill "-$1" "$torchrun_pid" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'interrupts=$((interrupts + 1)) && forward INT' INT
trap 'forward HUP' HUP
trap 'forward QUIT' QUIT
# a trap interrupts `wait`: wait again until torchrun has exited, then take its status
while kill -0 "$torchrun_pid" 2>/dev/null; do
    wait "$torchrun_pid" || true
done
wait "$torchrun_pid" && status=0 || status=$?
# a second Ctrl-C stopped the trainers at once: exit as a command stopped by Ctrl-C does
[ "$interrupts" -lt 2 ] || exit 130
exit "$status"
