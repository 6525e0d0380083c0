"""ApproxLinear and ApproxLinearDist: nn.Linear with column-row sampling in training."""
import torch.nn as nn
import torch.nn.functional as F

from ..functional import approx_linear, sampled_linear, sampled_linear_weight
from ..functional._layout import contiguous_weight
from ._config import SamplingConfig
from ._dist import WeightSampled


class ApproxLinear(SamplingConfig, nn.Linear):
    """nn.Linear whose training forward keeps k of the in_features pairs; eval is exact.

    A subclass of nn.Linear, so its state_dict, initialisation and isinstance checks are
    those of nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, *, sample_ratio=1.0, minimal_k=1,
                 policy="topk", mode="forward", weight_layout="input_major", device=None, dtype=None):
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_layout(weight_layout)

    def forward(self, input):
        if not self.training or not self.sampling_enabled:
            return F.linear(input, contiguous_weight(self.weight), self.bias)
        return approx_linear(input, self.weight, self.bias, sample_ratio=self.sample_ratio,
                             minimal_k=self.minimal_k, policy=self.policy, mode=self.mode)

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._sampling_repr()}"


class ApproxLinearDist(WeightSampled, nn.Linear):
    """ApproxLinear that selects features from the weights and a generator seeded
    with `seed` alone ('topk_weight', the default: the top-k by weight norm; 'topk_explore':
    the top channels plus a rotation over all of them, `explore` of the k;
    'bernoulli_weight'), so every DDP rank
    picks the same ones; `last_indices` holds the features of the last training forward."""

    def __init__(self, in_features, out_features, bias=True, *, sample_ratio=1.0, minimal_k=1,
                 policy="topk_weight", mode="forward", seed=0, weight_layout="input_major", explore=0.1,
                 device=None, dtype=None):
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_dist(seed, weight_layout, explore)

    def _exact(self, input):
        # The weight may be stored dim-1-major (see WeightSampled); BLAS given the
        # transposed operand sums in another order, so the exact product takes a
        # row-major copy to stay bit-identical to nn.Linear.
        return F.linear(input, contiguous_weight(self.weight), self.bias)

    def forward(self, input):
        if not self.training:
            self._note_dense_use()
            return self._exact(input)
        records = self._records_grad(input)
        idx, scale, prepared = self._selection(records)
        self._record(idx, records)
        if idx is None:
            return self._exact(input)
        return sampled_linear(input, self.weight, self.bias, idx, scale, self.mode,
                              prepared_weight=prepared)

    def _sampled_weight(self, w, idx, scale):
        return sampled_linear_weight(w, idx, scale)

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._sampling_repr()}, seed={self.seed}"
