#!/usr/bin/env bash
# Run on every node: torchrun with a c10d rendezvous on the head node.
#   HEAD_NODE=node001 NNODES=4 GPUS_PER_NODE=8 bash launch/multinode.sh --config configs/gpt-1.3b.json --tp 8 --pp 2 ...
set -euo pipefail
: "${HEAD_NODE:?set HEAD_NODE to the first node's hostname or IP}"
: "${NNODES:?set NNODES to the number of nodes}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}
cd "$(dirname "$0")/.."
exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$PORT" --rdzv-id "${RDZV_ID:-megaengine}" \
    pretrain_gpt.py "$@"
