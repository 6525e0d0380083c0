"""approx_conv2d: a 2-D convolution that keeps k of its input channels."""
import torch
from torch.nn.modules.utils import _pair

from ._amp import cast_for_autocast
from ._autograd import sampled_weight
from ._checks import check_conv_geometry, check_conv_operands, check_groups
from ._core import approx_product, sampled_product
from ._products import Conv2dProduct


def approx_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                  sample_ratio, minimal_k=1, policy="topk", mode="forward", generator=None):
    """Approximate ``F.conv2d``: column-row sampling over the input channels.

    Channel i contributes the pair (input[:, i], weight[:, i]); keeping k of them cuts the
    multiply-accumulates by k/n. With k == in_channels this is exactly ``F.conv2d``.
    ``padding`` is numeric (pad first for other padding modes); groups must be 1. An
    unbatched input (C, H, W) gives an unbatched output, as with ``F.conv2d``.
    """
    check_groups(groups)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints here, got {padding!r}")
    stride, padding, dilation = check_conv_geometry(stride, padding, dilation)
    check_conv_operands(input, weight, bias)
    if input.dim() == 3:
        return approx_conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                             sample_ratio=sample_ratio, minimal_k=minimal_k, policy=policy, mode=mode,
                             generator=generator).squeeze(0)
    product = Conv2dProduct(stride, padding, dilation, weight.shape[2:])
    (input, weight, bias), ctx = cast_for_autocast((input, weight, bias), input.device.type)
    with ctx:
        return approx_product(input, weight, bias, product, sample_ratio, minimal_k, policy,
                              mode, generator)


def sampled_conv2d(input, weight, bias, indices, scale=None, stride=1, padding=0, dilation=1,
                   mode="forward", *, prepared_weight=None):
    """``F.conv2d`` over the given sorted input-channel ``indices`` (scaled by ``scale``).

    ``prepared_weight``: what ``sampled_conv2d_weight`` returned for the same weight
    values, indices, scale and padding (mode 'forward'), so the forward skips the gather.
    An unbatched input (C, H, W) gives an unbatched output."""
    stride, padding, dilation = check_conv_geometry(stride, padding, dilation)
    check_conv_operands(input, weight, bias)
    if input.dim() == 3:
        return sampled_conv2d(input.unsqueeze(0), weight, bias, indices, scale, stride, padding, dilation,
                              mode, prepared_weight=prepared_weight).squeeze(0)
    product = Conv2dProduct(stride, padding, dilation, weight.shape[2:])
    (input, weight, bias), ctx = cast_for_autocast((input, weight, bias), input.device.type)
    with ctx:
        return sampled_product(input, weight, bias, indices, scale, product, mode, prepared_weight)


def sampled_conv2d_weight(weight, indices, scale=None, padding=0, stride=1, dilation=1, input_size=None):
    """The sampled weight operand of ``sampled_conv2d``, made ahead of its forward: the
    selected input channels (scaled), row-major unless the convolution is a 1x1 one
    without padding. Given the spatial ``input_size`` the forward will see, only the tap
    that reads the image where one alone does (see Conv2dProduct.reduce); a forward on
    another size gathers anew. No autograd graph; the forward's backward still reaches
    ``weight``."""
    product = Conv2dProduct(_pair(stride), _pair(padding), _pair(dilation), weight.shape[2:])
    with torch.no_grad():
        reduced = product.reduce(input_size) if input_size is not None else None
        if reduced is not None:
            _, take_w, product = reduced
            weight = take_w(weight)
        return sampled_weight(weight, indices, scale, product)
