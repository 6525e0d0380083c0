#!/usr/bin/env bash
# approxdist-train under mpirun: every process reads its rank from the MPI environment
# (Open MPI, MPICH/Intel MPI or MVAPICH2 variables).
#
# Usage:
#   NP=16 HOSTFILE=hosts.txt launch/mpirun.sh --model resnet50 --dataset imagefolder \
#     --data-path /data/imagenet --sample-ratio 0.5 --comm-hook sparse --output-dir runs/r50
#
# Environment:
#   NP           number of processes (default 2)
#   HOSTFILE     MPI host file (default: none, all processes on this host)
#   MASTER_ADDR  rendezvous host; if unset, rank 0's host name is broadcast with mpi4py
#                (pip install mpi4py), which must then be importable on every host
#   MASTER_PORT  rendezvous port (default 29500)
#   MPIRUN       mpirun executable (default mpirun); PYTHON: interpreter (default python)
set -euo pipefail

NP="${NP:-2}"
MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(-np "$NP")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
fi
# Open MPI forwards to remote hosts only the variables named with -x. This is Open MPI's
# syntax; with MPICH or Intel MPI use -genvlist MASTER_PORT,OMP_NUM_THREADS,PATH instead.
fwd=(-x MASTER_PORT -x OMP_NUM_THREADS -x PATH)
if [[ -n "${MASTER_ADDR:-}" ]]; then
  export MASTER_ADDR
  fwd+=(-x MASTER_ADDR)
fi

exec "$MPIRUN" "${args[@]}" "${fwd[@]}" "$PYTHON" -m approxdist.train "$@"
