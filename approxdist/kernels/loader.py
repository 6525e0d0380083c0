"""Builds (once, cached on disk) and loads the csrc/ extension.

Why JIT and not setup.py: the package installs without a compiler and without CUDA, and
a GPU machine builds its own CUDA code against its own torch. The first call that needs
the kernels compiles them with `torch.utils.cpp_extension.load` into a cache directory
keyed by the torch version and a hash of the sources and flags, so later processes (and
the other DDP ranks, which wait on torch's file lock) load the cached library. Nothing is
built at import time. Any failure leaves the pure-PyTorch path in charge with a single
warning, so training never stops for a missing compiler.
"""
import glob
import hashlib
import importlib.util
import logging
import os
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load", "build_cuda", "sources_dir", "cache_dir", "private_temp_dir", "cuda_home",
           "cuda_include_fixes"]

_SOURCES = ("pack.cpp",)
_CUDA_SOURCES = ("pack_cuda.cu",)
_CFLAGS = ["-O3"]
_CUDA_CFLAGS = ["-O3", "-DAPPROXDIST_WITH_CUDA"]

_lock = threading.Lock()
_state = {"tried": False, "ext": None}


def sources_dir() -> Optional[Path]:
    """csrc/ of a source checkout (editable install), else a copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "csrc", here / "csrc"):
        if (candidate / "pack.cpp").is_file():
            return candidate
    return None


def cuda_home() -> Optional[str]:
    """A toolkit root with bin/nvcc, preferring the one that matches torch's CUDA version.

    torch guesses from `which nvcc`, which on some machines is a wrapper in /usr/local/bin
    and yields CUDA_HOME=/usr/local, where linking fails (`cannot find -lcudart`).
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def cuda_include_fixes(home: str) -> List[str]:
    """Header dirs from the pip `nvidia-*` wheels, when the toolkit lacks torch's includes.

    torch's CUDA headers include cusparse.h and friends; a toolkit installed without those
    libraries has them only in the wheels that came with torch (site-packages/nvidia).
    """
    if os.path.isfile(os.path.join(home, "include", "cusparse.h")):
        return []
    found = []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    return found


def cache_dir(tag: str) -> Path:
    """Where the build of `tag` lives: $APPROXDIST_CACHE_DIR, else $XDG_CACHE_HOME/approxdist
    (~/.cache/approxdist); where that cannot be created (a read-only home in some
    containers), a private directory in the temp dir (`private_temp_dir`)."""
    root = os.environ.get("APPROXDIST_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "approxdist")
    path = Path(root) / tag
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = private_temp_dir() / tag
        path.mkdir(exist_ok=True)
    return path


def private_temp_dir() -> Path:
    """$TMPDIR/approxdist-<uid>, created 0700, or refused when someone else could have put
    a library there: the temp dir is shared by every user, and whoever owns or can write
    this directory chooses the code `load()` imports. It must be a real directory (not a
    link) owned by this uid and writable by no one else; anything else raises (and load
    falls back to the pure-PyTorch path with one warning)."""
    uid = os.getuid()
    path = Path(tempfile.gettempdir()) / f"approxdist-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"kernel cache {path} is not a directory (a link or a file): remove it, "
                           "or set APPROXDIST_CACHE_DIR to a directory of your own")
    if st.st_uid != uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"kernel cache {path} is owned by uid {st.st_uid} with mode "
                           f"{stat.S_IMODE(st.st_mode):o}; it must be owned by uid {uid} and writable by no one "
                           "else: remove it, or set APPROXDIST_CACHE_DIR to a directory of your own")
    return path


def _digest(src: Path, files, flags) -> str:
    # Every source and header counts: a changed header must rebuild too.
    h = hashlib.sha256()
    for path in sorted(src.glob("*.*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(repr(files).encode())
    h.update(repr((flags, sys.version_info[:2], torch.version.cuda)).encode())
    return h.hexdigest()[:16]


def _import_cpp_extension():
    # Its import logs "No CUDA runtime is found" on every CPU-only machine: not news here.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _build(src: Path, with_cuda: bool, verbose: bool):
    cpp_extension = _import_cpp_extension()

    files = list(_SOURCES) + (list(_CUDA_SOURCES) if with_cuda else [])
    cflags = _CFLAGS + (["-DAPPROXDIST_WITH_CUDA"] if with_cuda else [])
    includes = [str(src)]
    if with_cuda:
        home = cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit with bin/nvcc found (set CUDA_HOME)")
        # cpp_extension reads its module-level CUDA_HOME when it compiles and links.
        cpp_extension.CUDA_HOME = home
        includes += cuda_include_fixes(home)
    variant = "cuda" if with_cuda else "cpu"
    tag = f"{torch.__version__}-{variant}-{_digest(src, files, (cflags, _CUDA_CFLAGS, includes))}"
    name = f"approxdist_kernels_{variant}"
    build_dir = cache_dir(tag)
    prebuilt = _import_prebuilt(name, build_dir)
    if prebuilt is not None:
        return prebuilt
    return cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in files],
        extra_cflags=cflags,
        extra_cuda_cflags=_CUDA_CFLAGS if with_cuda else None,
        extra_include_paths=includes,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=verbose,
    )


def _import_prebuilt(name: str, build_dir: Path):
    """The library built earlier into a cache this process cannot write (an image's
    read-only layer, a directory of the root that built the image), or None.

    torch's load() would first take a lock file in that directory and fail, and the
    kernels would fall back to the reference in every non-root container. The directory's
    tag pins the torch version and a hash of the sources and flags, so the library there
    is the one load() would build: import it as it is."""
    lib = build_dir / f"{name}.so"
    if not lib.is_file() or os.access(build_dir, os.W_OK):
        return None
    spec = importlib.util.spec_from_file_location(name, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_cuda(verbose: bool = False):
    """Compile (or find in the cache) the CUDA variant now, GPU or not: the architectures
    come from TORCH_CUDA_ARCH_LIST, which must be set where no GPU is visible (torch
    would otherwise ask the missing GPU). Raises on any failure."""
    if not torch.version.cuda:
        raise RuntimeError("this torch build has no CUDA (torch.version.cuda is None): "
                           "the CUDA kernels need a CUDA build of torch")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        raise RuntimeError("no GPU visible: set TORCH_CUDA_ARCH_LIST to the architectures to compile "
                           "the CUDA kernels for, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'")
    src = sources_dir()
    if src is None:
        raise RuntimeError("csrc/ sources not found (non-editable install?): cannot compile the CUDA kernels")
    return _build(src, True, verbose)


def load(verbose: bool = False):
    """The extension module, or None where it cannot be built (warned about once)."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if _state["tried"]:
            return _state["ext"]
        try:
            _state["ext"] = _load(verbose)
        finally:
            _state["tried"] = True
    return _state["ext"]


def _load(verbose: bool):
    src = sources_dir()
    if src is None:
        warnings.warn("approxdist: csrc/ sources not found (non-editable install?); "
                      "pack/unpack use the pure-PyTorch path", RuntimeWarning, stacklevel=4)
        return None
    want_cuda = torch.cuda.is_available() and bool(torch.version.cuda)
    problems = []
    if want_cuda:
        try:
            return _build(src, True, verbose)
        except Exception as exc:  # noqa: BLE001 - any failure means: fall back
            problems.append(f"CUDA build failed ({_short(exc)}); CUDA tensors use the pure-PyTorch path")
    try:
        ext = _build(src, False, verbose)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"C++ build failed ({_short(exc)}); pack/unpack use the pure-PyTorch path")
        ext = None
    if problems:
        warnings.warn("approxdist kernels: " + "; ".join(problems), RuntimeWarning, stacklevel=4)
    return ext


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
