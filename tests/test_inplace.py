"""Outputs of the sampled ops accept the in-place ops that follow convolutions in real
models (inplace activations, squeeze-excitation): autograd forbids modifying a view
returned from a custom Function, so every product path must return a fresh tensor, and
the gradients after the in-place op must be those of the same op out of place."""
import pytest
import torch
import torch.nn.functional as F

from approxdist.functional import approx_conv2d, approx_linear, sampled_conv2d, sampled_linear
from approxdist.functional._layout import to_dim1_major
from approxdist.functional._products import Conv2dProduct, LinearProduct

D = torch.float64
# (stride, padding, dilation, kernel, image size): 1x1 folded (few pixels) and batched
# (many pixels), strided 1x1, 3x3, and the one-tap reduction (one output pixel).
GEOMETRIES = [(1, 0, 1, 1, 3), (1, 0, 1, 1, 12), (2, 0, 1, 1, 12), (1, 1, 1, 3, 6), (1, 1, 1, 3, 1)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _both(op, params):
    """(gradients with an in-place relu_ after op, gradients with relu out of place)."""
    out = op()
    g = torch.randn(out.shape, generator=_gen(9), dtype=out.dtype)
    ref = torch.autograd.grad(F.relu(op()), params, g)
    got = torch.autograd.grad(op().relu_(), params, g)
    return got, ref


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("mode", ["forward", "blackbox", "backward", "weight_grad"])
@pytest.mark.parametrize("layout", ["row", "input_major"])
@pytest.mark.parametrize("policy", ["topk", "bernoulli"])
def test_conv_output_takes_inplace_ops(geometry, mode, layout, policy):
    stride, padding, dilation, kernel, size = geometry
    g = _gen(0)
    x = torch.randn(3, 8, size, size, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(5, 8, kernel, kernel, generator=g, dtype=D)
    w = (to_dim1_major(w) if layout == "input_major" else w).requires_grad_()
    b = torch.randn(5, generator=g, dtype=D, requires_grad=True)
    # ratio 0.1 under bernoulli with a seed that draws nothing in some calls: the bias-only path too
    ratio = 0.1 if policy == "bernoulli" else 0.5

    def op():
        return approx_conv2d(x, w, b, stride, padding, dilation, sample_ratio=ratio, policy=policy,
                             mode=mode, generator=_gen(3))

    for a, r in zip(*_both(op, [x, w, b])):
        assert torch.equal(a, r)

    idx = torch.tensor([1, 4, 6])

    def op_sampled():
        return sampled_conv2d(x, w, b, idx, None, stride, padding, dilation)

    for a, r in zip(*_both(op_sampled, [x, w, b])):
        assert torch.equal(a, r)


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)])
@pytest.mark.parametrize("mode", ["forward", "blackbox", "backward", "weight_grad"])
def test_linear_output_takes_inplace_ops(shape, mode):
    g = _gen(1)
    x = torch.randn(*shape, generator=g, dtype=D, requires_grad=True)
    w = to_dim1_major(torch.randn(5, 8, generator=g, dtype=D)).requires_grad_()
    b = torch.randn(5, generator=g, dtype=D, requires_grad=True)

    def op():
        return approx_linear(x, w, b, sample_ratio=0.5, mode=mode)

    for a, r in zip(*_both(op, [x, w, b])):
        assert torch.equal(a, r)

    def op_sampled():
        return sampled_linear(x, w, b, torch.tensor([0, 3, 7]))

    for a, r in zip(*_both(op_sampled, [x, w, b])):
        assert torch.equal(a, r)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_products_return_fresh_tensors(geometry):
    """No copy is needed in the autograd Function: the products themselves return
    tensors that are not views (the Function's clone is a guard only)."""
    stride, padding, dilation, kernel, size = geometry
    product = Conv2dProduct((stride,) * 2, (padding,) * 2, (dilation,) * 2, (kernel,) * 2)
    x = torch.randn(3, 4, size, size)
    for w in (torch.randn(5, 4, kernel, kernel), to_dim1_major(torch.randn(5, 4, kernel, kernel))):
        for b in (None, torch.randn(5)):
            assert product.sampled(product.take(x, torch.arange(4), w), w, b)._base is None
    assert LinearProduct().sampled(torch.randn(6, 4), torch.randn(5, 4), torch.randn(5))._base is None
