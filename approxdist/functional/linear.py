"""approx_linear: a linear layer whose product keeps k of the in_features pairs."""
import math

import torch

from ._amp import cast_for_autocast
from ._autograd import sampled_weight
from ._checks import check_linear_operands
from ._core import approx_product, sampled_product
from ._products import LinearProduct

_PRODUCT = LinearProduct()


def _flat(input):
    # (not reshape(-1, n): with n == 0 the -1 would be ambiguous)
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def approx_linear(input, weight, bias=None, *, sample_ratio, minimal_k=1, policy="topk",
                  mode="forward", generator=None):
    """Approximate ``F.linear``: column-row sampling over the in_features dimension.

    With k == in_features (sample_ratio 1 or minimal_k >= in_features) this is exactly
    ``F.linear``. ``generator`` drives the random policies (never the global RNG when
    given). See docs/design.md for the policies and modes.
    """
    check_linear_operands(input, weight, bias)
    (input, weight, bias), ctx = cast_for_autocast((input, weight, bias), input.device.type)
    with ctx:
        out = approx_product(_flat(input), weight, bias, _PRODUCT, sample_ratio, minimal_k,
                             policy, mode, generator)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def sampled_linear(input, weight, bias, indices, scale=None, mode="forward", *, prepared_weight=None):
    """``F.linear`` over the given sorted in_features ``indices`` (scaled by ``scale``).

    ``prepared_weight``: what ``sampled_linear_weight`` returned for the same weight
    values, indices and scale (mode 'forward'), so the forward skips the gather."""
    check_linear_operands(input, weight, bias)
    (input, weight, bias), ctx = cast_for_autocast((input, weight, bias), input.device.type)
    with ctx:
        out = sampled_product(_flat(input), weight, bias, indices, scale, _PRODUCT, mode, prepared_weight)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def sampled_linear_weight(weight, indices, scale=None):
    """The sampled weight operand of ``sampled_linear``, made ahead of its forward (the
    selected columns, scaled). No autograd graph."""
    with torch.no_grad():
        return sampled_weight(weight, indices, scale, _PRODUCT)
