#!/usr/bin/env bash
# Launch HydraViT training with torchrun: ./distributed_train.sh NPROC DATA_DIR [hydravit.train args...]
#   NPROC: processes on this node (one per GPU; on CPU any number, backend gloo).
#   Single node (default): torchrun --standalone (a free local port, no rendezvous setup).
#   Multi-node: put torchrun's own flags in TORCHRUN_ARGS (they replace --standalone), e.g. on each node
#     TORCHRUN_ARGS="--nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500" ./distributed_train.sh 8 ...
#   PYTHON selects the interpreter (default: python3).
# Bad input (a flag, a missing file, an unreadable checkpoint, an empty data folder) is found by one plain process
# before torchrun starts: one "error:" line and exit 2, instead of NPROC copies and torchrun's ChildFailedError.
set -euo pipefail
PY="${PYTHON:-python3}"
usage="usage: $0 NPROC DATA_DIR [hydravit.train args...]   ($0 --help: the training flags)"
if [ "$#" -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
    echo "$usage"
    exec "$PY" -m hydravit.train --help
fi
if [ "$#" -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
NUM_PROC=$1
shift
# torchrun's own values: a count, or gpu / cpu / auto
if ! [[ "$NUM_PROC" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]]; then
    echo "$0: error: NPROC must be a positive number of processes (or gpu, cpu, auto), got '$NUM_PROC'" >&2
    exit 2
fi
for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        exec "$PY" -m hydravit.train --help
    fi
done
# The trainer's own checks, once, before any worker exists (prints nothing when all is well).
"$PY" -m hydravit.train --check-only "$@" || exit $?
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "$PY" -m torch.distributed.run --nproc-per-node="$NUM_PROC" ${TORCHRUN_ARGS:---standalone} \
    -m hydravit.train "$@"
