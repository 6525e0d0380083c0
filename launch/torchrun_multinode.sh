#!/usr/bin/env bash
# One node's share of a multi-node approxdist-train job under torchrun (c10d rendezvous).
#
# Usage: run the same command on every node, then approxdist-train's flags:
#   NNODES=4 MASTER_ADDR=node01 [MASTER_PORT=29500] [NPROC_PER_NODE=8] [MAX_RESTARTS=1] [NIC=ib0] \
#     launch/torchrun_multinode.sh --model resnet50 --dataset imagefolder --data-path /data/imagenet \
#       --sample-ratio 0.5 --comm-hook sparse --output-dir runs/r50 --resume auto
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank; only used with RDZV_BACKEND=static (c10d assigns ranks itself)
#   MASTER_ADDR     host of the rendezvous store, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     its port (default 29500)
#   NPROC_PER_NODE  processes per node: a number, "gpu" or "auto" (default auto: one per GPU, else per CPU)
#   MAX_RESTARTS    elastic restarts after a worker failure (default 0); with --output-dir the
#                   restarted workers continue from the last checkpoint
#   RDZV_BACKEND    c10d (default) or static
#   RDZV_ID         job id shared by all nodes (default approxdist)
#   RDZV_CONF       c10d rendezvous options, e.g. is_host=1 on the node that hosts the store
#                   when the nodes share a host name (default: none)
#   LOCAL_ADDR      this node's address as the others reach it (torchrun --local-addr;
#                   default: torchrun resolves the host name)
#   NIC             network interface of the job's traffic (e.g. ib0, eth0): default of
#                   GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (a value you set wins; default:
#                   none, gloo and NCCL pick an interface themselves)
#   TORCHRUN        torchrun executable (default: torchrun)
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-auto}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_ID="${RDZV_ID:-approxdist}"
TORCHRUN="${TORCHRUN:-torchrun}"

if [[ -n "${NIC:-}" ]]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NIC}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NIC}"
fi

rdzv=()
if [[ "$RDZV_BACKEND" == "static" ]]; then
  rdzv=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
else
  rdzv=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
  if [[ -n "${RDZV_CONF:-}" ]]; then
    rdzv+=(--rdzv-conf "$RDZV_CONF")
  fi
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
  rdzv+=(--local-addr "$LOCAL_ADDR")
fi

exec "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  "${rdzv[@]}" -m approxdist.train "$@"
