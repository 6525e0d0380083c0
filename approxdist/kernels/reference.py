"""Pure-PyTorch pack/unpack: the specification of the fused kernels and their fallback.

The packed form of a contiguous `g` with indices `idx` is `g.index_select(1, idx).reshape(-1)`;
of a dim-1-major `g` (`g.transpose(0, 1)` contiguous) it is
`g.transpose(0, 1).index_select(0, idx).reshape(-1)`: the selected slices in memory
order either way. A tensor without indices is packed whole, in memory order. Tensors
are concatenated in list order. This is
also what the DDP hook runs where no compiler is present, so it avoids the obvious
`torch.cat([g.index_select(1, idx).reshape(-1), ...])`: that allocates every gathered
slice and copies it a second time. Here each tensor is gathered straight into its slice
of the output (`index_select(out=)`), scattered back with `index_copy_`, and an index set
that holds every column (k == size(1), which for a valid set means all of them) becomes a
plain copy.

Callers validate first (see `checks.py`); these functions assume valid arguments.
"""
from typing import List, Optional, Sequence

import torch

from .checks import dim1_major

__all__ = ["pack_into", "unpack_from", "slice_numels"]


def slice_numels(grads: Sequence[torch.Tensor], indices: Sequence[Optional[torch.Tensor]]) -> List[int]:
    """Elements each tensor contributes to the packed buffer."""
    sizes = []
    for g, idx in zip(grads, indices):
        if idx is None:
            sizes.append(g.numel())
        elif g.shape[1] == 0:
            sizes.append(0)
        else:
            sizes.append(g.numel() // g.shape[1] * idx.numel())
    return sizes


def _pieces(flat: torch.Tensor, grads, indices):
    """(tensor in memory order, sampled dim, indices or None, its piece of flat)."""
    offset = 0
    for g, idx, n in zip(grads, indices, slice_numels(grads, indices)):
        piece = flat.narrow(0, offset, n)
        offset += n
        if n == 0:
            continue
        if dim1_major(g):
            g, dim = g.transpose(0, 1), 0
        else:
            dim = 1
        if idx is None or idx.numel() == g.shape[dim]:
            yield g.view(-1), dim, None, piece
        else:
            shape = list(g.shape)
            shape[dim] = idx.numel()
            yield g, dim, idx, piece.view(shape)


@torch.no_grad()
def pack_into(grads, indices, out: torch.Tensor) -> torch.Tensor:
    for g, dim, idx, piece in _pieces(out, grads, indices):
        if idx is None:
            piece.copy_(g)
        else:
            torch.index_select(g, dim, idx, out=piece)
    return out


@torch.no_grad()
def unpack_from(flat: torch.Tensor, grads, indices) -> None:
    for g, dim, idx, piece in _pieces(flat, grads, indices):
        if idx is None:
            g.copy_(piece)
        else:
            g.index_copy_(dim, idx, piece)
