#!/usr/bin/env bash
# Run the test suite against another torch release, e.g. the oldest one we support:
#
#   bash tools/test_other_torch.sh "torch==2.4.1 torchvision==0.19.1" [pytest args...]
#
# Checks out HEAD into a temporary git worktree, runs `make install TORCH="..."` there (pip
# downloads the releases: about 2.7 GB of CUDA wheels for torch 2.4.1 from PyPI) and runs
# pytest (default: the CI selection; pass `-m slow` for the
# slow tests). The worktree and its venv are removed afterwards unless KEEP=1. Uncommitted
# changes are not tested: commit first.
set -euo pipefail

if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: bash tools/test_other_torch.sh \"torch==X torchvision==Y\" [pytest args...]" >&2
  exit 2
fi
spec=$1
shift
repo=$(git rev-parse --show-toplevel)
dir=$(mktemp -d /tmp/approxdist-torch-XXXXXX)
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "kept: $dir" >&2
  else
    git -C "$repo" worktree remove --force "$dir" >/dev/null 2>&1 || rm -rf "$dir"
  fi
}
trap cleanup EXIT

git -C "$repo" worktree add --detach --force "$dir" HEAD >/dev/null
cd "$dir"
make install TORCH="$spec"
.venv/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
