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
MODES = ("forward", "backward", "blackbox", "weight_grad")
# The modes whose weight gradient is zero outside the selected input channels (what the
# sparse hook relies on), and those whose training forward is the exact product.
SPARSE_GRAD_MODES = ("forward", "weight_grad")
EXACT_FORWARD_MODES = ("backward", "weight_grad")


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


def check_seed(seed):
    """A generator seed: an integer torch.Generator.manual_seed takes (bool refused)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    return seed


def check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _pair_of(name, value, least):
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 \
            or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in pair):
        raise ValueError(f"{name} must be an integer >= {least} or a pair of them, got {value!r}")
    return tuple(pair)


def check_conv_geometry(stride, padding, dilation):
    """(stride, padding, dilation) as pairs: stride and dilation >= 1, padding >= 0."""
    return _pair_of("stride", stride, 1), _pair_of("padding", padding, 0), _pair_of("dilation", dilation, 1)


def check_kernel_size(kernel_size):
    return _pair_of("kernel_size", kernel_size, 1)


def _check_bias(bias, out):
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")


def check_linear_operands(input, weight, bias):
    """Shapes F.linear takes: weight (out_features, in_features), input (..., in_features)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must have shape (..., {weight.shape[1]}) (in_features of the weight), "
                         f"got {tuple(input.shape)}")
    _check_bias(bias, weight.shape[0])


def check_conv_operands(input, weight, bias):
    """Shapes F.conv2d takes (groups=1): weight (out, in, kh, kw), input (N, in, H, W) or
    unbatched (in, H, W)."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels, kh, kw), got shape {tuple(weight.shape)}")
    if input.dim() not in (3, 4) or input.shape[-3] != weight.shape[1]:
        raise ValueError(f"input must have shape (N, {weight.shape[1]}, H, W) or ({weight.shape[1]}, H, W), "
                         f"got {tuple(input.shape)}")
    _check_bias(bias, weight.shape[0])
