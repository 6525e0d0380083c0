"""What approx_linear and approx_conv2d share: argument checks, the choice of pairs and
the dispatch to the mode's autograd Function. Operands arrive with the sampled
dimension at dim 1 of both input and weight."""
import torch

from ._autograd import BackwardSampled, ForwardSampled, WeightGradSampled
from ._checks import WEIGHT_POLICIES, check_minimal_k, check_mode, check_policy, check_sample_ratio
from ._layout import contiguous_weight
from .sampling import channel_norms, num_samples, select_columns


def check_config(sample_ratio, minimal_k, policy, mode):
    check_sample_ratio(sample_ratio)
    check_minimal_k(minimal_k)
    check_policy(policy)
    check_mode(mode, policy)


def pair_scores(x, w, policy):
    """Per-pair scores for the policy: |B_i| for the weight policies, |A_i|*|B_i| else."""
    with torch.no_grad():
        w_norms = channel_norms(w, 1)
        if policy in WEIGHT_POLICIES:
            return w_norms
        return channel_norms(x, 1) * w_norms


def select_pairs(x, w, k, policy, generator=None):
    """(sorted indices, scale or None) of the k pairs to keep (k < n)."""
    return select_columns(pair_scores(x, w, policy), k, policy, generator)


def sampled_product(x, w, b, idx, scale, product, mode="forward", prepared_weight=None):
    """The product over the given pairs; mode 'forward' or 'blackbox'; for mode
    'weight_grad' the exact product whose weight gradient covers only the given pairs.

    Forward sampling works on a dim-1-major weight as it is (functional/_layout.py);
    'blackbox' runs torch's dense backward, which takes a row-major copy.
    prepared_weight: sampled_weight(w, idx, scale, product) made earlier from the same
    weight values (forward mode only; after product.reduce where that applies), so the
    forward does not gather it.

    In forward mode a product that reduces to a smaller one for this input
    (Conv2dProduct.reduce: one tap of a one-pixel output) runs as that one."""
    if prepared_weight is not None and mode != "forward":
        raise ValueError(f"prepared_weight is for mode 'forward' only, got mode {mode!r}")
    if mode == "weight_grad":
        return WeightGradSampled.apply(x, w, b, idx, scale, product)
    reduced = product.reduce(x.shape[2:]) if mode == "forward" else None
    if reduced is not None:
        take_x, take_w, product = reduced
        x, w = take_x(x), take_w(w)
    if prepared_weight is not None and (
            prepared_weight.dtype != w.dtype or prepared_weight.device != w.device
            or prepared_weight.shape != (w.shape[0], idx.numel()) + tuple(w.shape[2:])):
        prepared_weight = None  # made before an autocast cast or for another input size: gather anew
    if mode == "blackbox":
        w = contiguous_weight(w)
    return ForwardSampled.apply(x, w, b, idx, scale, product, mode == "blackbox", prepared_weight)


def approx_product(x, w, b, product, sample_ratio, minimal_k, policy, mode, generator):
    check_config(sample_ratio, minimal_k, policy, mode)
    if mode == "backward":
        w = contiguous_weight(w)  # torch's own products throughout
        k_out = num_samples(w.shape[0], sample_ratio, minimal_k)
        k_batch = num_samples(x.shape[0], sample_ratio, minimal_k)
        if k_out == w.shape[0] and k_batch == x.shape[0]:
            return product(x, w, b)
        return BackwardSampled.apply(x, w, b, k_out, k_batch, policy, generator, product)
    n = w.shape[1]
    k = num_samples(n, sample_ratio, minimal_k)
    if k == n:  # exactly torch's product, bit for bit
        return product(x, contiguous_weight(w), b)
    idx, scale = select_pairs(x, w, k, policy, generator)
    return sampled_product(x, w, b, idx, scale, product, mode)
