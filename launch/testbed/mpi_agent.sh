#!/usr/bin/env bash
# Open MPI's remote launch agent for approxdist's namespace testbed: stands in for ssh.
#
# Usage: mpirun calls it as it would call ssh, `mpi_agent.sh HOST COMMAND...`:
#   TESTBED_TAG=TAG mpirun --mca plm_rsh_agent launch/testbed/mpi_agent.sh \
#     --hostfile hosts ...          # hosts: 10.77.0.1 slots=1, 10.77.0.2 slots=1
# and run mpirun itself inside node 0 (`ip netns exec adtb-TAG-n0 mpirun ...`): the host's
# own namespace cannot reach the nodes' addresses.
#
# HOST is a node's address 10.77.0.(I+1) (or the name nI); the command runs in node I's
# namespace adtb-TAG-nI through `sh -c`, as ssh runs it through the remote shell, and with
# a fresh environment as ssh gives it (PATH and HOME only): a variable reaches the remote
# ranks only if mpirun forwards it (-x), as on a real cluster.
#
# Environment:
#   TESTBED_TAG  the testbed's tag (launch/testbed/setup.sh -t TAG), required
set -euo pipefail

die() { echo "mpi_agent.sh: $*" >&2; exit 2; }

[[ -n ${TESTBED_TAG:-} ]] || die "TESTBED_TAG must name the testbed (setup.sh -t TAG)"
[[ $TESTBED_TAG =~ ^[a-z0-9]{1,8}$ ]] || die "TESTBED_TAG must match [a-z0-9]{1,8}, got '$TESTBED_TAG'"
# ssh options Open MPI may pass before the host (e.g. -x to turn off X11 forwarding)
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
[[ $# -ge 2 ]] || die "expected HOST COMMAND..., got '$*'"
host=$1
shift
if [[ $host =~ ^10\.77\.0\.([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 1)); then
    node=$((BASH_REMATCH[1] - 1))
elif [[ $host =~ ^n([0-9]+)$ ]]; then
    node=${BASH_REMATCH[1]}
else
    die "HOST must be a testbed address 10.77.0.N or a name nI, got '$host'"
fi
exec ip netns exec "adtb-$TESTBED_TAG-n$node" env -i PATH="$PATH" HOME="${HOME:-/root}" sh -c "$*"
