"""Argument checks shared by the functional ops and the modules.

Every bad configuration raises a ValueError that names the argument and the allowed
values, because a silently wrong sample ratio would only show up as a worse model."""
import math

POLICIES = ("topk", "topk_weight", "random", "bernoulli", "bernoulli_weight", "uniform")
WEIGHT_POLICIES = ("topk_weight", "bernoulli_weight")
# The distributed layers' policies: the weight policies and 'topk_explore', which needs
# per-layer state (a rotation over the channels) and so exists only in nn/.
DIST_POLICIES = ("topk_explore",) + WEIGHT_POLICIES
WEIGHT_LAYOUTS = ("input_major", "contiguous")
MODES = ("forward", "backward", "blackbox")


def check_sample_ratio(sample_ratio):
    if isinstance(sample_ratio, bool) or not isinstance(sample_ratio, (int, float)):
        raise ValueError(f"sample_ratio must be a number in (0, 1], got {sample_ratio!r}")
    if math.isnan(sample_ratio) or not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio!r}")
    return float(sample_ratio)


def check_minimal_k(minimal_k):
    if isinstance(minimal_k, bool) or not isinstance(minimal_k, int) or minimal_k < 1:
        raise ValueError(f"minimal_k must be an integer >= 1, got {minimal_k!r}")
    return minimal_k


def check_policy(policy, allowed=POLICIES):
    if policy not in allowed:
        raise ValueError(f"policy must be one of {', '.join(map(repr, allowed))}; got {policy!r}")
    return policy


def check_mode(mode, policy=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if mode == "backward" and policy in DIST_POLICIES:
        # Backward sampling also samples the batch for the weight gradient, where the
        # weights give no scores; weight-only policies are for forward/blackbox.
        raise ValueError(
            f"mode='backward' needs a policy that scores both operands "
            f"('topk', 'random', 'bernoulli' or 'uniform'); got policy={policy!r}")
    return mode


def check_groups(groups):
    if groups != 1:
        raise NotImplementedError(
            f"column-row sampling across convolution groups is not defined here (groups={groups}); "
            "keep grouped/depthwise convolutions exact (convert_model does)")


def check_explore(explore):
    if isinstance(explore, bool) or not isinstance(explore, (int, float)) or math.isnan(explore) \
            or not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be a number in [0, 1], got {explore!r}")
    return float(explore)


def check_weight_layout(weight_layout):
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    return weight_layout
