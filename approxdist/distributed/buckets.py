"""Views of a DDP bucket's flat buffer, one per parameter, in DDP's own layout.

DDP lays each gradient out in the bucket with its parameter's strides when the parameter
is dense and non-overlapping (a dim-1-major weight of the distributed layers, a
channels_last one), row-major otherwise (`Reducer::initialize_bucket_views`).
`GradBucket.gradients()` returns row-major views of every piece, which scramble the
gradient of any parameter stored otherwise; these functions do not.
"""
import torch

from ..kernels.checks import dim1_major


def dense_strides(t: torch.Tensor) -> bool:
    """True when t's elements fill its storage span exactly once: a permutation of a
    contiguous layout (what DDP and AccumulateGrad keep)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    step = 1
    for s, n in dims:
        if s != step:
            return False
        step *= n
    return True


def _pieces(buffer: torch.Tensor, params):
    """(parameter, its flat piece of the bucket buffer) pairs, in bucket order."""
    pieces, offset = [], 0
    for p in params:
        pieces.append((p, buffer.narrow(0, offset, p.numel())))
        offset += p.numel()
    if offset != buffer.numel():
        raise RuntimeError(f"approxdist: bucket buffer holds {buffer.numel()} elements but its "
                           f"parameters {offset}; this DDP layout is not supported")
    return pieces


def parameter_views(buffer: torch.Tensor, params) -> list:
    """A view of `buffer` shaped and strided like each parameter's gradient in the bucket."""
    return [piece.view(p.shape) if p.is_contiguous() or not dense_strides(p)
            else piece.as_strided(p.shape, p.stride())
            for p, piece in _pieces(buffer, params)]


def sampling_views(buffer: torch.Tensor, params) -> list:
    """Views the pack/unpack kernels can sample along dim 1: as parameter_views, but a
    parameter in a layout the kernels do not handle (neither row-major nor dim-1-major,
    e.g. channels_last) gets its flat 1-D piece, which is then sent whole. Taken from
    buffer() rather than gradients() so wrappers that swap the buffer
    (fp16_compress_wrapper) see their own dtype."""
    views = []
    for p, piece in _pieces(buffer, params):
        if p.is_contiguous():
            views.append(piece.view(p.shape))
        elif dim1_major(p):
            views.append(piece.as_strided(p.shape, p.stride()))
        else:
            views.append(piece)
    return views
