#!/usr/bin/env bash
# Several nodes: the manager (gRPC API) on one node, instances started by torchrun on every
# node, joining the manager over an authenticated control connection.
#
# Environment (the same on every node):
#   MANAGER_ADDR       host the manager's control port is reachable at (node 0's address)
#   MANAGER_PORT       control port (default 29600); the gRPC API stays on LOONG_PORT
#   NNODES             number of nodes; GPUS_PER_NODE instances per node (default 8)
#   NODE_RANK          this node's index, 0..NNODES-1
#   MASTER_ADDR/PORT   torch.distributed rendezvous for the data plane (default MANAGER_ADDR:29500)
#   LOONG_CLUSTER_KEY  shared secret (hex), e.g. from `python3 -c "import secrets; print(secrets.token_hex(16))"`
#   LOONG_DEVICE       instance device (default cuda; cpu to try the launch on one machine)
#   MANAGER_BIND       interface the manager's control port binds (default 0.0.0.0)
#
#   node 0:    ROLE=manager bash launch/serve_multinode.sh [loong serve options]   (then ROLE=instances)
#   every node: ROLE=instances bash launch/serve_multinode.sh
#
# Trying it on one CPU machine (2 instances, loopback only):
#   export MANAGER_ADDR=127.0.0.1 MANAGER_BIND=127.0.0.1 NNODES=1 NODE_RANK=0 GPUS_PER_NODE=2 \
#          LOONG_DEVICE=cpu LOONG_CLUSTER_KEY=$(python3 -c "import secrets; print(secrets.token_hex(16))")
#   ROLE=manager bash launch/serve_multinode.sh --dtype float32 &
#   ROLE=instances bash launch/serve_multinode.sh
set -euo pipefail
: "${MANAGER_ADDR:?set MANAGER_ADDR}" "${NNODES:?set NNODES}" "${LOONG_CLUSTER_KEY:?set LOONG_CLUSTER_KEY}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MANAGER_PORT="${MANAGER_PORT:-29600}"
export LOONG_CLUSTER_KEY
if [ "${ROLE:-}" = "manager" ]; then
  exec loong serve --device "${LOONG_DEVICE:-cuda}" --instances $((NNODES * GPUS_PER_NODE)) \
    --cluster-address "${MANAGER_BIND:-0.0.0.0}:$MANAGER_PORT" --host "${LOONG_HOST:-127.0.0.1}" \
    --port "${LOONG_PORT:-50051}" "$@"
fi
: "${NODE_RANK:?set NODE_RANK}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "${MASTER_ADDR:-$MANAGER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
  -m loong.cluster.instance_main --manager "$MANAGER_ADDR:$MANAGER_PORT"
