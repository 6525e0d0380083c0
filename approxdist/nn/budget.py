"""Per-layer sample ratios from a byte budget.

One ratio for every layer spends the sampling where it saves little: a narrow early
convolution holds few gradient bytes but every one of its dropped channels perturbs all
later layers, while the wide late layers hold most of the bytes. Given the fraction of the
dense gradient bytes that the sparse hook may send per step, `budget_ratios` chooses
each layer's ratio r_l to minimise sum_l (1/r_l - 1) (the relative variance CRS adds to
a layer's output, summed over layers) under sum_l r_l * size_l <= budget's share of the
bytes. The Lagrange condition gives r_l = c / sqrt(size_l), capped at 1: big layers are
sampled hardest, small ones stay exact. c is found by bisection over the exact integer
channel counts the layers will use, so the payload the hook sends is the one promised.
"""
import math

from ..functional import num_samples


def _ratio_for(k, n):
    # int(n * ratio) must give back k exactly (see num_samples): aim at the middle.
    return 1.0 if k >= n else (k + 0.5) / n


def _ratios_at(c, layers):
    # A ratio of 0 is not one num_samples takes; minimal_k is the floor anyway.
    return [max(min(1.0, c / math.sqrt(size)), 1e-12) for size, _ in layers]


def payload_fraction(layers, dense_elements, ratios, minimal_k=1):
    """The fraction of dense gradient elements sent when layer l (size, n_in) keeps
    num_samples(n_in, ratios[l]) of its input channels; dense_elements counts every
    gradient element, the sampled layers' included."""
    sampled_full = sum(size for size, _ in layers)
    sent = dense_elements - sampled_full
    for (size, n), r in zip(layers, ratios):
        sent += num_samples(n, r, minimal_k) * (size // n)
    return sent / dense_elements


def budget_ratios(layers, dense_elements, budget, minimal_k=1):
    """Ratios (one per layer, in order) for layers given as (weight numel, input channels).

    Raises ValueError when the budget is below what keeping minimal_k channels of every
    layer sends, or above 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) \
            or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    if not layers:
        raise ValueError("budget: the model has no layer that can be sampled")

    def sent(c):
        return payload_fraction(layers, dense_elements, _ratios_at(c, layers), minimal_k)

    if sent(0.0) > budget:
        raise ValueError(f"budget must be at least {sent(0.0):.4f} for this model (every sampled layer "
                         f"keeping minimal_k={minimal_k} channels and the rest sent dense), got {budget}")
    lo, hi = 0.0, max(math.sqrt(size) for size, _ in layers)  # at hi every layer is exact
    if sent(hi) <= budget:
        lo = hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if sent(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return [_ratio_for(num_samples(n, r, minimal_k), n) for (_, n), r in zip(layers, _ratios_at(lo, layers))]

__all__ = ["budget_ratios", "payload_fraction"]
