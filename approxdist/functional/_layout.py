"""The dim-1-major memory layout of sampled weights.

An (O, I, ...) weight stored with dim 1 outermost (`w.transpose(0, 1)` contiguous) keeps
every input channel in one block of memory. The distributed layers use it so that the
gradient slices of the selected channels, which the sparse all-reduce hook packs every
step, are whole blocks rather than a few floats per row. Values, shape and dtype are
those of the weight; only the strides differ.

Where such a weight meets an op that wants row-major memory (the exact convolution at
k == n, eval mode), `contiguous_weight` converts it, and its gradient back, with 2-D
blocked transposes: torch's copy of a 4-D transposed 1x1 weight is ~6x slower.
"""
import torch

__all__ = ["dim1_major", "dim1_major_strides", "to_dim1_major", "dim1_outer", "zeros_like_layout", "contiguous_weight",
           "select_dim1"]


def dim1_major(t: torch.Tensor) -> bool:
    """True when dim 1 is outermost in memory and t is not plain contiguous."""
    return t.dim() >= 2 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def dim1_major_strides(shape) -> tuple:
    """The strides of an (O, I, ...) tensor stored dim-1-major: its contiguous
    (I, O, ...) transpose, as torch computes them (a size-1 dim gets the stride of what
    follows it)."""
    order = [1, 0] + list(range(2, len(shape)))
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def to_dim1_major(t: torch.Tensor) -> torch.Tensor:
    """t with the same values, laid out dim-1-major (t itself when it already is or has
    fewer than 2 dims)."""
    if t.dim() < 2 or t.transpose(0, 1).is_contiguous():
        return t
    return _transpose_copy(t)


def zeros_like_layout(shape, stride, like: torch.Tensor) -> torch.Tensor:
    """Zeros of `shape` with `stride` when given (a weight's layout), else contiguous."""
    if stride is None:
        return like.new_zeros(shape)
    return like.new_empty_strided(shape, stride).zero_()


def _transpose_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in the other layout: row-major t -> dim-1-major, otherwise (dim-1-major)
    -> row-major.

    A 1x1 / linear weight is a matrix transpose: done as a 2-D one, which torch blocks."""
    rows, cols = t.shape[0], t.shape[1]
    if t.is_contiguous():
        if t.numel() == rows * cols and rows > 1 and cols > 1:
            return t.view(rows, cols).t().contiguous().t().view(t.shape)
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.numel() == rows * cols and rows > 1 and cols > 1:
        return t.reshape(rows, cols).contiguous().view(t.shape)  # reshape: a view of t
    return t.contiguous()


class _ContiguousWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return _transpose_copy(w)

    @staticmethod
    def backward(ctx, g):
        return _transpose_copy(g.contiguous())


def contiguous_weight(w: torch.Tensor) -> torch.Tensor:
    """A row-major copy of a dim-1-major weight (w itself otherwise), differentiable; its
    gradient comes back dim-1-major, so AccumulateGrad takes it without another copy."""
    if not dim1_major(w):
        return w
    return _ContiguousWeight.apply(w)


def dim1_outer(t: torch.Tensor) -> bool:
    """True when dim 1 is the outer one in memory: t is dim-1-major, or a slice of such a
    tensor (one tap of a dim-1-major conv weight), whose channels are strided blocks."""
    return dim1_major(t) or (t.dim() >= 2 and t.stride(1) > t.stride(0))


def select_dim1(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w.index_select(1, idx), gathered as whole blocks when w is dim-1-major (the result
    is then dim-1-major too), and along dim 0 of w.transpose(0, 1) whenever dim 1 is the
    outer one in memory (one tap of a dim-1-major weight): index_select along a
    non-contiguous dim copies w first."""
    if dim1_outer(w):
        return w.transpose(0, 1).index_select(0, idx).transpose(0, 1)
    return w.index_select(1, idx)
