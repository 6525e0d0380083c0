"""Modules over approxdist.functional: the approximate layers, their weight-sampled
(*Dist) forms for data-parallel training, convert_model and the seed-compatible aliases.
Nothing here imports torch.distributed."""
from ._dist import WeightSampled, load_sampler_state, pop_touched_of, sampler_state, touched_count_of
from ._registry import sampled_layer_of, sampled_layers_of
from .aliases import approx_Conv2d, approx_Conv2d_dist, approx_Linear
from .attention import ApproxMultiheadAttention, ApproxMultiheadAttentionDist
from .conv import ApproxConv2d, ApproxConv2dDist
from .convert import convert_model
from .linear import ApproxLinear, ApproxLinearDist
from .norm_stats import exact_norm_stats, norm_stats_of, remove_norm_stats
from .schedule import SamplingSchedule, remove_schedule, schedule_of, set_sampling

__all__ = ["ApproxLinear", "ApproxConv2d", "ApproxLinearDist", "ApproxConv2dDist", "convert_model",
           "approx_Linear", "approx_Conv2d", "approx_Conv2d_dist", "sampler_state",
           "load_sampler_state", "sampled_layer_of", "sampled_layers_of", "pop_touched_of", "touched_count_of",
           "WeightSampled", "exact_norm_stats", "remove_norm_stats", "norm_stats_of", "SamplingSchedule",
           "set_sampling", "schedule_of", "remove_schedule", "ApproxMultiheadAttention",
           "ApproxMultiheadAttentionDist"]
