#!/usr/bin/env bash
# Build and install Horovod (PyTorch + Gloo + MPI, CPU) into the active Python environment.
#
# Why a script rather than `pip install horovod`: the last release (0.28.1, June 2023) predates
# the torch versions we support, so a plain install fails in three ways this script works around:
#   1. pip's CMake 4 rejects the bundled gloo's `cmake_minimum_required` -> CMAKE_POLICY_VERSION_MINIMUM=3.5
#   2. Horovod's CMakeLists strips every -std= from CXXFLAGS and its torch plugin forces C++14, while
#      torch >= 2.1 headers need C++17 and torch >= 2.10 need C++20 -> a compiler wrapper that appends
#      the standard torch needs *last* (the last -std wins in g++).
#   3. a CUDA build of torch (the default PyPI wheel) makes Horovod build its CUDA operations, which
#      needs a full CUDA toolkit and NCCL; patch 0001 (tools/horovod-patches/) adds HOROVOD_CPU_ONLY=1,
#      set here unless HOROVOD_GPU_OPERATIONS is given, so the CPU (Gloo/MPI) extension builds anyway.
#   Every tools/horovod-patches/*.patch is applied to the sdist (see docs/horovod.md).
# Horovod records the torch it was built against; when torch changes, rebuild (this script notices).
#
# Usage: tools/build_horovod.sh            # build if Horovod is missing or built for another torch
#        HOROVOD_FORCE_REBUILD=1 tools/build_horovod.sh
# Env:   PYTHON (default: .venv/bin/python if present, else python3), HOROVOD_VERSION (0.28.1),
#        HOROVOD_BUILD_DIR (build/horovod), HOROVOD_WITH_MPI (1 if mpicxx is found, else 0),
#        HOROVOD_CPU_ONLY (1 unless HOROVOD_GPU_OPERATIONS is set), MAKEFLAGS (default -j$(nproc)).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
VERSION="${HOROVOD_VERSION:-0.28.1}"
BUILD_DIR="${HOROVOD_BUILD_DIR:-$ROOT/build/horovod}"
PATCH_DIR="$ROOT/tools/horovod-patches"

torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')" || {
    echo "build_horovod: torch is not importable with $PYTHON; install torch first" >&2; exit 1; }

# Cache check: the installed Horovod must load its torch extension against *this* torch.
if [[ -z "${HOROVOD_FORCE_REBUILD:-}" ]] && "$PYTHON" - "$VERSION" <<'PY' 2>/dev/null
import sys, horovod, horovod.torch as hvd
sys.exit(0 if horovod.__version__ == sys.argv[1] else 1)
PY
then
    echo "build_horovod: horovod $VERSION already works with torch $torch_version; nothing to do"
    exit 0
fi

# The C++ standard torch's headers require (torch/all.h states it; cpp_extension passes the same flag).
std="$("$PYTHON" - <<'PY'
import os, re, torch
hdr = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "api", "include", "torch", "all.h")
text = open(hdr).read() if os.path.exists(hdr) else ""
print("c++20" if "202002L" in text else "c++17")
PY
)"

if [[ -z "${HOROVOD_WITH_MPI+x}" ]]; then
    if command -v mpicxx >/dev/null 2>&1; then HOROVOD_WITH_MPI=1; else HOROVOD_WITH_MPI=0; fi
fi
if [[ "$HOROVOD_WITH_MPI" == 1 ]]; then
    export HOROVOD_WITH_MPI=1
else
    unset HOROVOD_WITH_MPI; export HOROVOD_WITHOUT_MPI=1
    echo "build_horovod: mpicxx not found (apt-get install -y openmpi-bin libopenmpi-dev); building Gloo only"
fi

# Wheel cache, outside the checkout so a clean clone (CI) reuses it: one wheel per
# Horovod version, torch version and Python, since Horovod binds to the torch it saw.
py_tag="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
CACHE="${HOROVOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/approxdist/horovod}"
wheel_dir="$CACHE/$VERSION-torch$torch_version-$py_tag"
# The wheel is built with --no-deps; Horovod's runtime requirements come separately.
install_wheel() {
    "$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
    "$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
}
if [[ -z "${HOROVOD_FORCE_REBUILD:-}" ]] && compgen -G "$wheel_dir/horovod-*.whl" >/dev/null; then
    echo "build_horovod: installing the cached wheel from $wheel_dir"
    install_wheel
    if "$PYTHON" -c 'import horovod.torch' 2>/dev/null; then exit 0; fi
    echo "build_horovod: the cached wheel does not load; rebuilding" >&2
fi
rm -rf "$wheel_dir"
mkdir -p "$wheel_dir"

mkdir -p "$BUILD_DIR"
cxx_real="${CXX:-$(command -v g++ || command -v c++)}"
wrapper="$BUILD_DIR/cxx-$std"
cat >"$wrapper" <<WRAP
#!/bin/sh
# Appends -std=$std after everything else: Horovod's CMake strips and overrides the standard.
exec "$cxx_real" "\$@" -std=$std
WRAP
chmod +x "$wrapper"

sdist="$BUILD_DIR/horovod-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$BUILD_DIR" "horovod==$VERSION"
fi
src="$BUILD_DIR/horovod-$VERSION"
rm -rf "$src"
tar -xzf "$sdist" -C "$BUILD_DIR"
shopt -s nullglob
for p in "$PATCH_DIR"/*.patch; do
    echo "build_horovod: applying $(basename "$p")"
    patch -d "$src" -p1 --forward <"$p"
done
shopt -u nullglob

# Build requirements that --no-build-isolation expects to find (torch must be the venv's own).
"$PYTHON" -m pip install --quiet "setuptools" "wheel" "packaging"
if ! command -v cmake >/dev/null 2>&1; then "$PYTHON" -m pip install --quiet "cmake"; fi

if [[ -z "${HOROVOD_GPU_OPERATIONS:-}" ]]; then export HOROVOD_CPU_ONLY="${HOROVOD_CPU_ONLY:-1}"; fi
echo "build_horovod: horovod $VERSION for torch $torch_version, $std, MPI=${HOROVOD_WITH_MPI:-0}, CPU only=${HOROVOD_CPU_ONLY:-0}"
export CXX="$wrapper"
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
start=$(date +%s)
"$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -v -w "$wheel_dir" "$src"
echo "build_horovod: built in $(( $(date +%s) - start )) s; wheel cached in $wheel_dir"
install_wheel
"$PYTHON" -c 'import horovod.torch as hvd, horovod; print("horovod", horovod.__version__, "gloo", hvd.gloo_built(), "mpi", hvd.mpi_built())'
