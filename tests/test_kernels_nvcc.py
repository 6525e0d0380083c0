"""The CUDA kernels compile where nvcc is present, even without a GPU.

Machines without a GPU never build pack_cuda.cu through the loader, so without this
check a compile error would first show up on the GPU machine. It compiles the object
file only (no link, no launch) with the flags the loader's JIT build uses.
"""
import os
import subprocess
import sysconfig

import pytest
import torch

from approxdist.kernels import loader

pytestmark = [pytest.mark.nvcc, pytest.mark.slow]


def _std_flag():
    # torch >= 2.10 headers require C++20; older ones are C++17 (the floor is torch 2.4).
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    with open(aten) as f:
        return "-std=c++20" if "C++20" in f.read() else "-std=c++17"


@pytest.mark.skipif(loader.cuda_home() is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit)")
@pytest.mark.skipif(not torch.version.cuda, reason="this torch build has no CUDA")
def test_pack_cuda_compiles(tmp_path):
    cpp_extension = loader._import_cpp_extension()
    home = loader.cuda_home()
    src = loader.sources_dir()
    includes = (cpp_extension.include_paths("cuda") + loader.cuda_include_fixes(home)
                + [str(src), sysconfig.get_paths()["include"]])
    obj = tmp_path / "pack_cuda.o"
    cmd = [os.path.join(home, "bin", "nvcc"), "-c", _std_flag(), "-O3", "-DAPPROXDIST_WITH_CUDA",
           "-gencode", "arch=compute_90,code=sm_90", "--compiler-options", "-fPIC",
           *[f"-I{p}" for p in includes], str(src / "pack_cuda.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
    # Both directions of every element size were instantiated.
    nm = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True)
    if nm.returncode == 0:
        for size in (1, 2, 4, 8):
            for direction in ("true", "false"):
                assert f"pack_kernel<{size}, {direction}>" in nm.stdout


@pytest.mark.skipif(loader.cuda_home() is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit)")
@pytest.mark.skipif(not torch.version.cuda, reason="this torch build has no CUDA")
def test_cuda_extension_builds_links_and_imports(tmp_path, monkeypatch):
    # The whole JIT path a GPU machine takes on first use (toolkit discovery, the header
    # fix-up, nvcc + host compile, linking against cudart), short of launching: the
    # module must import here and its CPU half must still be right.
    monkeypatch.setenv("APPROXDIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # one arch: no GPU here to pick it
    ext = loader._build(loader.sources_dir(), True, False)
    assert ext.with_cuda()
    g = torch.randn(4, 6, 3, 3)
    idx = torch.tensor([1, 3, 4])
    out = torch.empty(4 * 3 * 9)
    ext.pack([g, torch.randn(2)], [idx, None], torch.empty(4 * 3 * 9 + 2))
    ext.pack([g], [idx], out)
    assert torch.equal(out, g.index_select(1, idx).reshape(-1))
