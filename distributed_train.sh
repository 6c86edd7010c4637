#!/usr/bin/env bash
# Launch HydraViT training with torchrun: ./distributed_train.sh NPROC DATA_DIR [hydravit.train args...]
#   NPROC: processes on this node (one per GPU; on CPU any number, backend gloo).
#   Single node (default): torchrun --standalone (a free local port, no rendezvous setup).
#   Multi-node: put torchrun's own flags in TORCHRUN_ARGS (they replace --standalone), e.g. on each node
#     TORCHRUN_ARGS="--nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500" ./distributed_train.sh 8 ...
#   PYTHON selects the interpreter (default: python3).
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 NPROC DATA_DIR [hydravit.train args...]" >&2
    exit 2
fi
NUM_PROC=$1
shift
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "${PYTHON:-python3}" -m torch.distributed.run --nproc-per-node="$NUM_PROC" ${TORCHRUN_ARGS:---standalone} \
    -m hydravit.train "$@"
