"""Pack the sampled slices of many gradients into one flat buffer, and scatter it back.

The sparse all-reduce hook sends only the input channels every rank sampled. Done per
parameter with index_select + cat that is several copies and (on a GPU) launches per
parameter; these functions do a whole dtype group in one fused pass: C++ on the CPU,
one CUDA kernel launch on a GPU, and the pure-PyTorch `reference` as the specification
and fallback. All three give bit-identical results (the copies move bits, they never
compute).

`grads[i]` is sampled along dim 1 (input channels of an (O, I, kh, kw) conv weight,
input features of an (O, I) linear weight); `indices[i]` is a sorted int64 tensor of the
selected positions on the tensor's device, or None for a dense tensor (biases, norms,
every 1-D tensor). The packed layout is `torch.cat([g.index_select(1, idx).reshape(-1)
or g.reshape(-1), ...])`.

The compiled kernels are built on first use, never at import (see `loader.py`);
`APPROXDIST_KERNELS=torch` in the environment forces the pure-PyTorch path, read at
every call so a test or benchmark can switch it.
"""
import os
from typing import Optional, Sequence

import torch

from . import loader, reference
from .checks import check_flat, check_index_values, check_structure

__all__ = ["pack", "unpack", "packed_numel", "backend", "build", "reference"]

# The compiled kernels move 2-, 4- and 8-byte elements of these dtypes; any other dtype
# takes the reference path.
_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MODES = ("auto", "torch")


def _mode() -> str:
    mode = os.environ.get("APPROXDIST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"APPROXDIST_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def _compiled(device: torch.device, dtype: torch.dtype):
    """The extension if it handles tensors of this device and dtype, else None."""
    if dtype not in _COMPILED_DTYPES or _mode() == "torch":
        return None
    if device.type not in ("cpu", "cuda"):
        return None
    ext = loader.load()
    if ext is None or (device.type == "cuda" and not ext.with_cuda()):
        return None
    return ext


def packed_numel(grads: Sequence[torch.Tensor], indices: Sequence[Optional[torch.Tensor]]) -> int:
    """Elements of the packed buffer: the hook sizes its payload with it."""
    grads, indices = check_structure(grads, indices)
    return sum(reference.slice_numels(grads, indices))


def _fast_ext(grads, indices, validate: bool):
    """The extension when it may take the call unchecked by Python, else None.

    The compiled path does its own structural checks (same messages); the Python checks
    cost ~2 us per tensor, more than the whole GPU kernel for a resnet50 bucket. Index
    values are checked by the C++ CPU path as it reads them; on CUDA that would need a
    host sync, so validate=True there takes the checked path.
    """
    if not (isinstance(grads, (list, tuple)) and isinstance(indices, (list, tuple)) and grads):
        return None
    g0 = grads[0]
    if not isinstance(g0, torch.Tensor):
        return None
    device = g0.device
    if validate and device.type != "cpu":
        return None
    return _compiled(device, g0.dtype)


def _explain(exc: TypeError, grads, indices):
    # pybind rejects a non-tensor entry with a TypeError listing signatures; name it.
    check_structure(grads, indices)
    raise exc


def _check_divisor(divisor) -> float:
    if divisor is None:
        return 1.0
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or not divisor > 0 \
            or divisor == float("inf"):
        raise ValueError(f"divisor must be a finite number > 0 (the world size), got {divisor!r}")
    return float(divisor)


def pack(grads, indices, out: Optional[torch.Tensor] = None, *, validate: bool = True,
         divisor=None) -> torch.Tensor:
    """Gathers the selected slices of `grads` into one flat tensor (`out` when given).

    validate=False skips reading the index values (sorted, unique, in range), which on
    CUDA costs a host synchronisation; the caller then vouches for them.
    divisor (e.g. the world size): the result is divided by it, with the bits of
    `out.div_(divisor)`; the C++ path divides each piece as it copies it, which saves a
    pass over the buffer.
    """
    div = _check_divisor(divisor)
    ext = _fast_ext(grads, indices, validate)
    if ext is not None:
        try:
            return ext.pack(grads, indices, out, div)
        except TypeError as exc:
            _explain(exc, grads, indices)
    grads, indices = check_structure(grads, indices)
    numel = sum(reference.slice_numels(grads, indices))
    dtype = grads[0].dtype if grads else None
    device = grads[0].device if grads else None
    if out is None:
        out = torch.empty(numel, dtype=dtype or torch.get_default_dtype(), device=device or "cpu")
    else:
        check_flat(out, "out", numel, dtype, device)
    if not grads:
        return out
    if validate:
        check_index_values(grads, indices)
    ext = _compiled(device, dtype)
    if ext is not None:
        return ext.pack(grads, indices, out, div)
    reference.pack_into(grads, indices, out)
    if div != 1.0:
        out.div_(divisor)
    return out


def unpack(flat: torch.Tensor, grads, indices, *, validate: bool = True) -> None:
    """Writes `flat` (laid out as `pack` makes it) into the selected slices of `grads`.

    Positions outside the selection are left untouched.
    """
    ext = _fast_ext(grads, indices, validate)
    if ext is not None and isinstance(flat, torch.Tensor):
        try:
            ext.unpack(flat, grads, indices)
            return
        except TypeError as exc:
            _explain(exc, grads, indices)
    grads, indices = check_structure(grads, indices)
    numel = sum(reference.slice_numels(grads, indices))
    dtype = grads[0].dtype if grads else None
    device = grads[0].device if grads else None
    check_flat(flat, "flat", numel, dtype, device)
    if not grads:
        return
    if validate:
        check_index_values(grads, indices)
    ext = _compiled(device, dtype)
    if ext is not None:
        ext.unpack(flat, grads, indices)
        return
    reference.unpack_from(flat, grads, indices)


def backend() -> str:
    """"cuda", "cpp" or "torch": what runs pack/unpack for this machine's tensors.

    On a machine with a GPU that is the CUDA path ("torch" if the CUDA build failed even
    when the C++ CPU build succeeded); without one, the C++ CPU path. Triggers the build.
    """
    if _mode() == "torch":
        return "torch"
    ext = loader.load()
    if ext is None:
        return "torch"
    if torch.cuda.is_available():
        return "cuda" if ext.with_cuda() else "torch"
    return "cpp"


def build(verbose: bool = False, *, cuda: bool = False) -> str:
    """Compiles the kernels now (e.g. from `make install`) and returns `backend()`.

    cuda=True also compiles the CUDA kernels where no GPU is visible (a `docker build`),
    for the architectures in TORCH_CUDA_ARCH_LIST, into the cache (`loader.cache_dir`)
    that a later process on a GPU loads them from; it raises on failure instead of
    falling back, since an image without its kernels should not build."""
    if cuda not in (True, False):
        raise ValueError(f"cuda must be True or False, got {cuda!r}")
    if cuda:
        loader.build_cuda(verbose=verbose)
    if _mode() != "torch":
        loader.load(verbose=verbose)
    return backend()
