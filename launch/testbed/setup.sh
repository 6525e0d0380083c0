#!/usr/bin/env bash
# Build a multi-node testbed on one machine: N "nodes", each a Linux network namespace
# with its own address, joined through a bridge, every link rate-limited in both
# directions with tc tbf.
#
# Usage (as root):
#   launch/testbed/setup.sh [-n NODES] [-r RATE] [-b BURST] [-l LATENCY] [-t TAG]
#     -n NODES    number of nodes, 2..200                          (default 2)
#     -r RATE     tbf rate per direction of every link, e.g. 1gbit, 100mbit;
#                 "none" leaves the links unshaped                  (default 1gbit)
#     -b BURST    tbf bucket size, e.g. 128kb (default: 1 ms at RATE, at least 96kb)
#     -l LATENCY  tbf queueing limit, e.g. 20ms                    (default 20ms)
#     -t TAG      names this testbed, [a-z0-9]{1,8}, so several can coexist  (default 0)
#   launch/testbed/teardown.sh -t TAG      removes it again (always run it, also on failure)
#
# Layout (nothing is added to the host's own network namespace):
#   adtb-TAG-hub            holds bridge br0 and one veth end vI per node
#   adtb-TAG-nI (I=0..N-1)  holds lo and eth0 = 10.77.0.(I+1)/24, the other end of vI
# Both ends of every veth get a tbf qdisc on egress: eth0 shapes what node I sends,
# vI shapes what node I receives (tbf only shapes egress, so shaping "ingress" means
# shaping the peer's egress). Traffic can only reach loopback and these namespaces.
#
# Why these choices:
# - tbf, not netem: netem is not available on this kernel, so links have a rate but no
#   added delay.
# - tbf lets up to BURST bytes through at full speed; messages smaller than the burst
#   are not shaped, so keep BURST small next to the messages you measure. It must hold
#   a whole 64 KiB GSO segment, though: tbf splits a larger packet, and the split pieces
#   cost the link (lost packets at 500mbit; the figures are in README.md).
# - every namespace shares the host name, so a c10d rendezvous inside the testbed needs
#   `--local-addr 10.77.0.(I+1)` and `--rdzv-conf is_host=1` on node 0 (is_host=0
#   elsewhere), and on torch 2.4, whose c10d rendezvous tells the workers node 0's host
#   name, the static rendezvous at node 0's address instead; gloo needs
#   GLOO_SOCKET_IFNAME=eth0. approxdist/bench/testbed.py builds those arguments.
#
# What setup creates is recorded, one namespace per line, in
# /run/approxdist-testbed/TAG.netns before the namespace exists; teardown.sh deletes only
# namespaces listed there, so it never touches one it did not create.
set -euo pipefail

NODES=2
RATE=1gbit
BURST=
LATENCY=20ms
TAG=0
STATE_DIR=${APPROXDIST_TESTBED_STATE_DIR:-/run/approxdist-testbed}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "setup.sh: $*" >&2; exit 2; }

while getopts ":n:r:b:l:t:h" opt; do
    case $opt in
        n) NODES=$OPTARG ;;
        r) RATE=$OPTARG ;;
        b) BURST=$OPTARG ;;
        l) LATENCY=$OPTARG ;;
        t) TAG=$OPTARG ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG (see -h)" ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

if ! [[ $NODES =~ ^[0-9]+$ ]] || ((NODES < 2 || NODES > 200)); then
    die "-n NODES must be 2..200, got '$NODES'"
fi
[[ $TAG =~ ^[a-z0-9]{1,8}$ ]] || die "-t TAG must match [a-z0-9]{1,8}, got '$TAG'"
[[ $LATENCY =~ ^[0-9.]+(us|ms|s)$ ]] || die "-l LATENCY must look like 20ms, got '$LATENCY'"

# Rate to bits per second, so the default burst can be derived and a typo fails early.
rate_bps() {
    local v=$1 num unit
    [[ $v =~ ^([0-9]+(\.[0-9]+)?)([kmg]?)(bit|bps)$ ]] || return 1
    num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
    case $unit in k) mul=1000 ;; m) mul=1000000 ;; g) mul=1000000000 ;; *) mul=1 ;; esac
    [[ ${BASH_REMATCH[4]} == bps ]] && mul=$((mul * 8))
    awk -v n="$num" -v m="$mul" 'BEGIN { printf "%d\n", n * m }'
}
if [[ $RATE != none ]]; then
    BPS=$(rate_bps "$RATE") || die "-r RATE must look like 1gbit, 100mbit or none, got '$RATE'"
    ((BPS > 0)) || die "-r RATE must be positive, got '$RATE'"
    if [[ -z $BURST ]]; then
        # 1 ms of traffic: small enough that the rate holds for any message of interest,
        # large enough that tbf does not starve a 1gbit link on a coarse timer; and at
        # least 96 KiB, a 64 KiB GSO segment with room to spare (see above).
        BURST=$((BPS / 8 / 1000))
        ((BURST >= 98304)) || BURST=98304
    fi
    [[ $BURST =~ ^[0-9]+(b|kb|mb|k|m)?$ ]] || die "-b BURST must look like 64kb, got '$BURST'"
fi

((EUID == 0)) || die "needs root (network namespaces, veth, tc)"
command -v ip >/dev/null || die "needs iproute2's ip"
if [[ $RATE != none ]]; then command -v tc >/dev/null || die "needs iproute2's tc"; fi

PREFIX=adtb-$TAG
HUB=$PREFIX-hub
MARKER=$STATE_DIR/$TAG.netns

mkdir -p "$STATE_DIR"
[[ -e $MARKER ]] && die "testbed '$TAG' already exists ($MARKER); run teardown.sh -t $TAG first"
for ns in "$HUB" $(seq -f "$PREFIX-n%g" 0 $((NODES - 1))); do
    if ip netns list | awk '{print $1}' | grep -qx -- "$ns"; then
        die "namespace $ns exists but was not made by this setup; not touching it"
    fi
done

# From here on a failure removes whatever was built so far.
trap 'echo "setup.sh: failed, tearing down testbed $TAG" >&2; "$HERE/teardown.sh" -t "$TAG" >&2 || true' ERR
{
    echo "# made by launch/testbed/setup.sh pid $$ at $(date -u +%FT%TZ)"
    echo "# nodes=$NODES rate=$RATE burst=${BURST:-} latency=$LATENCY"
} >"$MARKER"

new_netns() {
    echo "$1" >>"$MARKER"  # recorded first: a half-made namespace is still cleaned up
    ip netns add "$1"
    ip -n "$1" link set lo up
}

shape() {  # shape NETNS DEV
    [[ $RATE == none ]] && return 0
    tc -n "$1" qdisc replace dev "$2" root tbf rate "$RATE" burst "$BURST" latency "$LATENCY"
}

new_netns "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up

for ((i = 0; i < NODES; i++)); do
    ns=$PREFIX-n$i
    new_netns "$ns"
    ip -n "$ns" link add eth0 type veth peer name "v$i" netns "$HUB"
    ip -n "$HUB" link set "v$i" master br0
    ip -n "$HUB" link set "v$i" up
    ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    shape "$ns" eth0
    shape "$HUB" "v$i"
done
trap - ERR

echo "testbed $TAG: $NODES nodes, rate $RATE per direction${BURST:+, burst $BURST}, latency $LATENCY"
for ((i = 0; i < NODES; i++)); do
    echo "  node $i: netns $PREFIX-n$i  eth0 10.77.0.$((i + 1))"
done
