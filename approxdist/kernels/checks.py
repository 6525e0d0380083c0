"""Argument checks of pack/unpack, split by cost.

`check_structure` reads only metadata (shapes, dtypes, devices, strides), so it always
runs. `check_index_values` reads the index tensors: it is cheap (indices are a small
fraction of the gradients) but on CUDA it synchronises with the host, which is why the
hook's hot path may switch it off with `validate=False`. The C++ CPU kernels read the
indices anyway to build their runs and reject the same inputs there.
"""
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["check_structure", "check_flat", "check_index_values", "dim1_major"]


def dim1_major(g: torch.Tensor) -> bool:
    """True for a tensor laid out with dim 1 outermost (`g.transpose(0, 1)` contiguous)
    that is not plain contiguous: a selected column is then one block of memory."""
    return g.dim() >= 2 and not g.is_contiguous() and g.transpose(0, 1).is_contiguous()


def check_structure(grads, indices) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Returns grads and indices as lists (indices made contiguous) after checking them."""
    if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
        raise ValueError(f"grads must be a list of tensors, got {type(grads).__name__}")
    if isinstance(indices, torch.Tensor) or not isinstance(indices, (list, tuple)):
        raise ValueError(f"indices must be a list of tensors or None, got {type(indices).__name__}")
    if len(grads) != len(indices):
        raise ValueError(f"grads and indices must have the same length, got {len(grads)} and {len(indices)}")
    grads = list(grads)
    indices = list(indices)
    dtype = device = None
    for i, (g, idx) in enumerate(zip(grads, indices)):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"grads[{i}] must be a tensor, got {type(g).__name__}")
        if dtype is None:
            dtype, device = g.dtype, g.device
        elif g.dtype != dtype:
            raise ValueError(f"grads[{i}] has dtype {g.dtype} but grads[0] has {dtype}: "
                             "pack one dtype group per call")
        elif g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[0] is on {device}")
        if not (g.is_contiguous() or dim1_major(g)):
            raise ValueError(f"grads[{i}] must be contiguous or dim-1-major (shape {tuple(g.shape)}, "
                             f"stride {g.stride()}): the packed layout follows its memory order")
        if idx is None:
            continue
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"indices[{i}] must be a LongTensor or None, got {type(idx).__name__}")
        if g.dim() < 2:
            raise ValueError(f"indices[{i}] must be None for the {g.dim()}-D tensor grads[{i}]: "
                             "only dim 1 of a matrix or conv weight is sampled")
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"indices[{i}] must be a 1-D int64 tensor, got {idx.dim()}-D {idx.dtype}")
        if idx.device != g.device:
            raise ValueError(f"indices[{i}] is on {idx.device} but grads[{i}] is on {g.device}")
        if idx.numel() > g.shape[1]:
            raise ValueError(f"indices[{i}] has {idx.numel()} entries but grads[{i}] has only "
                             f"{g.shape[1]} positions along dim 1")
        if not idx.is_contiguous():
            indices[i] = idx.contiguous()
    return grads, indices


def check_flat(flat, name: str, numel: int, dtype, device) -> None:
    if not isinstance(flat, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(flat).__name__}")
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(flat.shape)}")
    if flat.numel() != numel:
        raise ValueError(f"{name} has {flat.numel()} elements but the selection packs to {numel}")
    if dtype is not None and flat.dtype != dtype:
        raise ValueError(f"{name} has dtype {flat.dtype} but grads have {dtype}")
    if device is not None and flat.device != device:
        raise ValueError(f"{name} is on {flat.device} but grads are on {device}")


def check_index_values(grads: Sequence[torch.Tensor], indices: Sequence[Optional[torch.Tensor]]) -> None:
    """Sorted, duplicate-free and within [0, size(1)), decided with one host read."""
    sel = [(i, idx, grads[i].shape[1]) for i, idx in enumerate(indices) if idx is not None and idx.numel()]
    if not sel:
        return
    cat = torch.cat([idx for _, idx, _ in sel])
    lengths = torch.tensor([idx.numel() for _, idx, _ in sel])
    ends = lengths.cumsum(0).to(cat.device)
    starts = ends - lengths.to(cat.device)
    limits = torch.tensor([n for _, _, n in sel], device=cat.device)
    ok_range = (cat[starts] >= 0) & (cat[ends - 1] < limits)
    # Within a segment each step must increase; steps across a boundary are exempt.
    steps_ok = cat[1:] > cat[:-1]
    steps_ok[ends[:-1] - 1] = True
    if bool(ok_range.all() & steps_ok.all()):
        return
    for i, idx, n in sel:  # rare: find the offender for the message
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"indices[{i}] has entries in [{lo}, {hi}], outside [0, {n}) of grads[{i}] dim 1")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"indices[{i}] must be sorted in increasing order without duplicates")
    raise AssertionError("index check disagreed with itself")  # pragma: no cover
