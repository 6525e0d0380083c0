#!/usr/bin/env bash
# approxdist-train under mpirun: every process reads its rank from the MPI environment
# (Open MPI, MPICH/Intel MPI or MVAPICH2 variables).
#
# Usage:
#   NP=16 HOSTFILE=hosts.txt NIC=ib0 launch/mpirun.sh --model resnet50 --dataset imagefolder \
#     --data-path /data/imagenet --sample-ratio 0.5 --comm-hook sparse --output-dir runs/r50
#   launch/mpirun.sh --dist horovod --comm-hook sparse ...     # Horovod, MPI controller
#
# Environment:
#   NP           number of processes (default 2)
#   HOSTFILE     MPI host file (default: none, all processes on this host)
#   MASTER_ADDR  rendezvous host; if unset, rank 0 broadcasts its address with mpi4py
#                (pip install mpi4py), which must then be importable on every host
#   MASTER_PORT  rendezvous port (default 29500)
#   NIC          network interface of the job's traffic (e.g. ib0, eth0): default of
#                GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (a value you set wins) and
#                Open MPI's btl_tcp_if_include/oob_tcp_if_include (default: none, each picks)
#   BIND_TO      --bind-to policy (default none: a rank's intra-op and data loader threads
#                may use every core; Open MPI binds each rank to one core otherwise)
#   FORWARD      more variable names to forward, space separated (default: none)
#   MPIRUN_ARGS  more mpirun options, split on spaces (e.g. "--mca plm_rsh_agent ssh")
#   MPIRUN       mpirun executable (default mpirun); PYTHON: interpreter (default python)
#
# Forwarded to every rank (Open MPI starts remote ranks without the caller's environment):
# PATH, LD_LIBRARY_PATH, PYTHONPATH, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS and every
# variable set whose name starts with NCCL_, GLOO_, TORCH_, APPROXDIST_, HOROVOD_, CUDA_
# (but not CUDA_VISIBLE_DEVICES, which belongs to each node) or UCX_, plus FORWARD.
set -euo pipefail

NP="${NP:-2}"
MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python}"
BIND_TO="${BIND_TO:-none}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if ! [[ "$NP" =~ ^[1-9][0-9]*$ ]]; then
  echo "mpirun.sh: NP must be a positive integer, got '$NP'" >&2; exit 2
fi
if [[ -n "${NIC:-}" ]]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NIC}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NIC}"
fi

args=(-np "$NP" --bind-to "$BIND_TO")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NIC:-}" ]]; then
  args+=(--mca btl_tcp_if_include "$NIC" --mca oob_tcp_if_include "$NIC")
fi
read -r -a extra <<<"${MPIRUN_ARGS:-}"
args+=("${extra[@]}")

# Open MPI forwards to remote hosts only the variables named with -x. This is Open MPI's
# syntax; with MPICH or Intel MPI use -genvlist with the same names (comma separated) and
# -bind-to none instead.
names=(PATH MASTER_PORT OMP_NUM_THREADS)
for name in LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR; do
  if [[ -n "${!name:-}" ]]; then
    export "${name?}"
    names+=("$name")
  fi
done
for name in $(compgen -e); do
  case "$name" in
    CUDA_VISIBLE_DEVICES) ;;  # each node's own (its scheduler sets it): never this host's
    NCCL_*|GLOO_*|TORCH_*|APPROXDIST_*|HOROVOD_*|CUDA_*|UCX_*) names+=("$name") ;;
  esac
done
read -r -a more <<<"${FORWARD:-}"
names+=("${more[@]}")
fwd=()
for name in "${names[@]}"; do
  fwd+=(-x "$name")
done

exec "$MPIRUN" "${args[@]}" "${fwd[@]}" "$PYTHON" -m approxdist.train "$@"
