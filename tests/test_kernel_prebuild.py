"""`approxdist.kernels.build(cuda=True)`: the CUDA kernels compiled where no GPU is visible
(`docker build`, issue 31), for the architectures in TORCH_CUDA_ARCH_LIST.

torch's cpp_extension is replaced by a recorder, so these check the path chosen (the CUDA
sources, with_cuda, the cache directory a GPU process later loads from) without nvcc;
the slow test at the bottom compiles for real where nvcc is installed."""
import os

import pytest
import torch

import approxdist.kernels as K
from approxdist.kernels import loader


class Recorder:
    """Stands in for torch.utils.cpp_extension: records load()'s arguments."""

    CUDA_HOME = None

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def load(self, **kwargs):
        self.calls.append(dict(kwargs, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST")))
        if self.fail and kwargs["with_cuda"]:
            raise RuntimeError(self.fail)
        return object()


@pytest.fixture
def no_gpu(tmp_path, monkeypatch):
    """No GPU, a CUDA build of torch and a toolkit (both faked where missing), a fresh cache."""
    home = tmp_path / "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.4")
    monkeypatch.setattr(loader, "cuda_home", lambda: str(home))
    monkeypatch.setattr(loader, "cuda_include_fixes", lambda h: [])
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    monkeypatch.setenv("APPROXDIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    rec = Recorder()
    monkeypatch.setattr(loader, "_import_cpp_extension", lambda: rec)
    return rec


def test_without_a_gpu_cuda_true_compiles_the_cuda_sources_for_the_arch_list(no_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;8.0;8.6;9.0+PTX")
    assert K.build(cuda=True) == "cpp"  # no GPU here: the CPU variant serves this process
    cuda = [c for c in no_gpu.calls if c["with_cuda"]]
    assert len(cuda) == 1, no_gpu.calls
    (call,) = cuda
    assert [os.path.basename(s) for s in call["sources"]] == ["pack.cpp", "pack_cuda.cu"]
    assert call["name"] == "approxdist_kernels_cuda" and "-DAPPROXDIST_WITH_CUDA" in call["extra_cflags"]
    assert call["arch_list"] == "7.0;8.0;8.6;9.0+PTX"
    build_dir = call["build_directory"]
    assert build_dir.startswith(str(tmp_path / "cache")) and "-cuda-" in os.path.basename(build_dir)
    # The CUDA variant's directory is the one a GPU process picks: same tag, same cache.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    loader.load()
    assert no_gpu.calls[-1]["with_cuda"] and no_gpu.calls[-1]["build_directory"] == build_dir


def test_default_build_without_a_gpu_compiles_no_cuda(no_gpu, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert K.build() == "cpp"
    assert [c["with_cuda"] for c in no_gpu.calls] == [False]


def test_cuda_true_without_a_gpu_needs_the_arch_list(no_gpu, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        K.build(cuda=True)
    assert no_gpu.calls == []


def test_cuda_true_raises_when_the_compile_fails(no_gpu, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    no_gpu.fail = "nvcc fatal: Unsupported gpu architecture"
    with pytest.raises(RuntimeError, match="Unsupported gpu architecture"):
        K.build(cuda=True)


def test_cuda_true_needs_a_cuda_torch(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    with pytest.raises(RuntimeError, match="no CUDA"):
        K.build(cuda=True)


def test_cuda_must_be_a_bool():
    with pytest.raises(ValueError, match="cuda must be True or False"):
        K.build(cuda="yes")


@pytest.mark.slow
@pytest.mark.nvcc
@pytest.mark.skipif(loader.cuda_home() is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit)")
@pytest.mark.skipif(not torch.version.cuda, reason="this torch build has no CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the build without a GPU")
def test_cuda_true_really_compiles_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("APPROXDIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    assert K.build(cuda=True) == "cpp"
    (lib,) = tmp_path.glob("*-cuda-*/approxdist_kernels_cuda.so")
    assert lib.stat().st_size > 0
