#!/usr/bin/env bash
# Remove a testbed made by launch/testbed/setup.sh.
#
# Usage (as root):
#   launch/testbed/teardown.sh [-t TAG]    removes testbed TAG (default 0)
#   launch/testbed/teardown.sh -a          removes every testbed setup.sh recorded
#
# Only namespaces listed in /run/approxdist-testbed/TAG.netns (written by setup.sh as it
# made them) and named adtb-TAG-* are deleted; anything else, even with a similar name,
# is left alone. Deleting a namespace deletes its veth ends, bridge and qdiscs with it,
# so nothing else needs undoing. Processes still running inside a node keep their
# namespace alive after `ip netns delete`; stop them first (testbed.py does).
# Safe to run twice: a testbed that is already gone is not an error.
set -uo pipefail

TAG=0
ALL=0
STATE_DIR=${APPROXDIST_TESTBED_STATE_DIR:-/run/approxdist-testbed}

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "teardown.sh: $*" >&2; exit 2; }

while getopts ":t:ah" opt; do
    case $opt in
        t) TAG=$OPTARG ;;
        a) ALL=1 ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG (see -h)" ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected arguments: $*"
[[ $TAG =~ ^[a-z0-9]{1,8}$ ]] || die "-t TAG must match [a-z0-9]{1,8}, got '$TAG'"
((EUID == 0)) || die "needs root"

status=0
remove_testbed() {  # remove_testbed TAG
    local tag=$1 marker=$STATE_DIR/$1.netns ns
    if [[ ! -f $marker ]]; then
        echo "teardown.sh: no testbed '$tag' recorded ($marker); nothing to remove" >&2
        return 0
    fi
    local existing
    existing=$(ip netns list | awk '{print $1}')
    # Nodes first, hub last, in reverse order of creation.
    while read -r ns; do
        [[ -z $ns || $ns == \#* ]] && continue
        if [[ ! $ns =~ ^adtb-$tag-(hub|n[0-9]+)$ ]]; then
            echo "teardown.sh: $marker lists '$ns', not a name setup.sh makes; skipped" >&2
            status=1
            continue
        fi
        grep -qx -- "$ns" <<<"$existing" || continue
        ip netns delete "$ns" || status=1
    done < <(tac "$marker")
    if ((status == 0)); then
        rm -f "$marker"
        echo "testbed $tag removed"
    fi
}

if ((ALL)); then
    shopt -s nullglob
    for marker in "$STATE_DIR"/*.netns; do
        tag=$(basename "$marker" .netns)
        [[ $tag =~ ^[a-z0-9]{1,8}$ ]] && remove_testbed "$tag"
    done
else
    remove_testbed "$TAG"
fi
exit $status
