"""The dim-1-major memory layout of sampled weights.

An (O, I, ...) weight stored with dim 1 outermost (`w.transpose(0, 1)` contiguous) keeps
every input channel in one block of memory. The distributed layers use it so that the
gradient slices of the selected channels, which the sparse all-reduce hook packs every
step, are whole blocks rather than a few floats per row. Values, shape and dtype are
those of the weight; only the strides differ.
"""
import torch

__all__ = ["dim1_major", "to_dim1_major", "zeros_like_layout"]


def dim1_major(t: torch.Tensor) -> bool:
    """True when dim 1 is outermost in memory and t is not plain contiguous."""
    return t.dim() >= 2 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def to_dim1_major(t: torch.Tensor) -> torch.Tensor:
    """t with the same values, laid out dim-1-major (t itself when it already is or has
    fewer than 2 dims)."""
    if t.dim() < 2 or dim1_major(t) or t.transpose(0, 1).is_contiguous():
        return t
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def zeros_like_layout(shape, stride, like: torch.Tensor) -> torch.Tensor:
    """Zeros of `shape` with `stride` when given (a weight's layout), else contiguous."""
    if stride is None:
        return like.new_zeros(shape)
    return like.new_empty_strided(shape, stride).zero_()
