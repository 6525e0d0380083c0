"""Sampling policies and the approximate ops: pure functions, no module state, nothing
from torch.distributed."""
from ._checks import MODES, POLICIES, WEIGHT_POLICIES
from ._core import select_pairs
from .conv import approx_conv2d, sampled_conv2d, sampled_conv2d_weight
from .linear import approx_linear, sampled_linear, sampled_linear_weight
from .sampling import bernoulli_probabilities, channel_norms, num_samples, select_columns

__all__ = ["num_samples", "approx_linear", "approx_conv2d", "sampled_linear", "sampled_conv2d",
           "sampled_linear_weight", "sampled_conv2d_weight",
           "select_columns", "select_pairs", "bernoulli_probabilities", "channel_norms", "POLICIES", "MODES",
           "WEIGHT_POLICIES"]
