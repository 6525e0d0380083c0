#!/usr/bin/env bash
# approxdist-train under Horovod: `horovodrun` starts the processes, Horovod (not
# torch.distributed) reduces the gradients, through approxdist.horovod.DistributedOptimizer
# so only the sampled channels travel.
#
# Usage:
#   launch/horovodrun.sh --model resnet18 --dataset cifar10 --sample-ratio 0.5 --output-dir runs/hvd
#   NP=8 HOSTS=node1:4,node2:4 launch/horovodrun.sh --model resnet50 ...
#   CONTROLLER=mpi NP=4 launch/horovodrun.sh ...        # Horovod's MPI controller instead of Gloo
#
# Environment:
#   NP          number of processes (default 2)
#   HOSTS       horovodrun -H list, host:slots[,host:slots] (default localhost:$NP)
#   CONTROLLER  gloo (default) or mpi
#   NIC         network interface for Gloo/MPI traffic (default: horovodrun picks); also the
#               default of GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (a value you set wins)
#   HOROVODRUN  launcher (default horovodrun); PYTHON: interpreter (default python)
# Needs Horovod: `make horovod` (see docs/horovod.md). Arguments go to approxdist-train
# after `--dist horovod`.
set -euo pipefail

NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
CONTROLLER="${CONTROLLER:-gloo}"
HOROVODRUN="${HOROVODRUN:-horovodrun}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "$CONTROLLER" in
  gloo|mpi) ;;
  *) echo "horovodrun.sh: CONTROLLER must be gloo or mpi, got '$CONTROLLER'" >&2; exit 2 ;;
esac
if ! [[ "$NP" =~ ^[1-9][0-9]*$ ]]; then
  echo "horovodrun.sh: NP must be a positive integer, got '$NP'" >&2; exit 2
fi

args=(-np "$NP" -H "$HOSTS" "--$CONTROLLER")
if [[ -n "${NIC:-}" ]]; then
  args+=(--network-interface "$NIC")
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NIC}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NIC}"
fi

exec "$HOROVODRUN" "${args[@]}" "$PYTHON" -m approxdist.train --dist horovod "$@"
