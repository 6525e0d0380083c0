"""The CUDA kernel's index arithmetic, executed on the host.

Without a GPU the loader never runs pack_cuda.cu, so a wrong division, an off-by-one
when a thread's vector crosses an inner slice, column or row, or a bad block-to-tensor
search would only show on the GPU machine. csrc/emulate/pack_kernel_host.cpp compiles
the very kernel source (pack_kernel.cuh) with the CUDA keywords emulated, runs every
(block, thread) serially on random cases (element sizes 1-8 bytes, misaligned buffers,
dense tensors, empty/all/single/run/scattered index sets, the 64-bit path forced) and
compares byte for byte with a plain loop; it also checks the fast division exhaustively
at the edges and on random divisors up to 2^31.
"""
import shutil
import subprocess

import pytest

from approxdist.kernels import loader


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = loader.sources_dir()
    if src is None:
        pytest.skip("csrc/ not present (non-editable install)")
    exe = tmp_path_factory.mktemp("emu") / "pack_kernel_host"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wno-unknown-pragmas", f"-I{src}",
                    str(src / "emulate" / "pack_kernel_host.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cuda_kernel_emulated_matches_loops(emulator, seed):
    proc = subprocess.run([str(emulator), str(seed), "150"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status, cases, elements = proc.stdout.split()
    assert status == "ok" and int(cases) == 150 and int(elements) > 0
