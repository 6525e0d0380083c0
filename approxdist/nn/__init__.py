"""Modules over approxdist.functional: the approximate layers, their weight-sampled
(*Dist) forms for data-parallel training, convert_model and the seed-compatible aliases.
Nothing here imports torch.distributed."""
from ._dist import WeightSampled, load_sampler_state, sampler_state
from ._registry import sampled_layer_of
from .aliases import approx_Conv2d, approx_Conv2d_dist, approx_Linear
from .attention import ApproxMultiheadAttention, ApproxMultiheadAttentionDist
from .conv import ApproxConv2d, ApproxConv2dDist
from .convert import convert_model
from .linear import ApproxLinear, ApproxLinearDist
from .norm_stats import exact_norm_stats, norm_stats_of, remove_norm_stats

__all__ = ["ApproxLinear", "ApproxConv2d", "ApproxLinearDist", "ApproxConv2dDist", "convert_model",
           "approx_Linear", "approx_Conv2d", "approx_Conv2d_dist", "sampler_state",
           "load_sampler_state", "sampled_layer_of", "WeightSampled", "exact_norm_stats",
           "remove_norm_stats", "norm_stats_of", "ApproxMultiheadAttention", "ApproxMultiheadAttentionDist"]
