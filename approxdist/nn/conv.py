"""ApproxConv2d and ApproxConv2dDist: nn.Conv2d with input-channel sampling in training."""
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..functional import approx_conv2d, sampled_conv2d, sampled_conv2d_weight
from ..functional._checks import check_conv_geometry, check_groups, check_kernel_size
from ..functional._layout import contiguous_weight
from ._config import SamplingConfig
from ._dist import WeightSampled


def _check_conv_args(kernel_size, stride, padding, dilation, groups):
    """What nn.Conv2d accepts but cannot run (stride 0 divides by zero later, ...)."""
    check_groups(groups)
    check_kernel_size(kernel_size)
    check_conv_geometry(stride, 0 if isinstance(padding, str) else padding, dilation)


class _ApproxConvBase(nn.Conv2d):
    def _padding_plan(self):
        """(padding applied to the input up front or None, the convolution's numeric
        padding): non-'zeros' padding modes and an uneven 'same' are padded up front."""
        if self.padding_mode != "zeros":
            return (self._reversed_padding_repeated_twice, self.padding_mode), (0, 0)
        if isinstance(self.padding, str):  # 'same' / 'valid'
            if self.padding == "valid":
                return None, (0, 0)
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            pad = [t // 2 for t in total]
            if all(t % 2 == 0 for t in total):
                return None, tuple(pad)
            lr = []
            for t, p in zip(reversed(total), reversed(pad)):
                lr += [p, t - p]
            return (lr, "constant"), (0, 0)
        return None, _pair(self.padding)

    def _padded(self, input):
        """(input, numeric padding), see _padding_plan."""
        up_front, padding = self._padding_plan()
        if up_front is not None:
            input = F.pad(input, up_front[0], mode=up_front[1])
        return input, padding

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._sampling_repr()}"


class ApproxConv2d(SamplingConfig, _ApproxConvBase):
    """nn.Conv2d whose training forward keeps k of the input channels; eval is exact."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, sample_ratio=1.0, minimal_k=1,
                 policy="topk", mode="forward", weight_layout="input_major", device=None, dtype=None):
        _check_conv_args(kernel_size, stride, padding, dilation, groups)
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._init_layout(weight_layout)

    def forward(self, input):
        if not self.training or not self.sampling_enabled:
            return self._conv_forward(input, contiguous_weight(self.weight), self.bias)
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        x, padding = self._padded(input)
        return approx_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, 1,
                             sample_ratio=self.sample_ratio, minimal_k=self.minimal_k,
                             policy=self.policy, mode=self.mode)


class ApproxConv2dDist(WeightSampled, _ApproxConvBase):
    """ApproxConv2d that selects input channels from the weights and a generator seeded
    with `seed` alone ('topk_weight', the default: the top-k by weight norm; 'topk_explore':
    the top channels plus a rotation over all of them, `explore` of the k;
    'bernoulli_weight'), so every DDP rank
    picks the same ones; `last_indices` holds the channels of the last training forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, sample_ratio=1.0, minimal_k=1,
                 policy="topk_weight", mode="forward", seed=0, weight_layout="input_major", explore=0.1,
                 device=None, dtype=None):
        _check_conv_args(kernel_size, stride, padding, dilation, groups)
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._init_dist(seed, weight_layout, explore)

    def forward(self, input):
        # The exact convolution takes a row-major copy of a dim-1-major weight (made
        # with a blocked transpose; torch would copy it elementwise inside the conv).
        if not self.training:
            self._note_dense_use()
            return self._conv_forward(input, contiguous_weight(self.weight), self.bias)
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        records = self._records_grad(input)
        idx, scale, prepared = self._selection(records)
        self._record(idx, records)
        if idx is None:
            return self._conv_forward(input, contiguous_weight(self.weight), self.bias)
        x, padding = self._padded(input)
        self._input_size = tuple(x.shape[2:])  # for prepare_next: the form of the weight operand
        return sampled_conv2d(x, self.weight, self.bias, idx, scale, self.stride, padding,
                              self.dilation, self.mode, prepared_weight=prepared)

    def _sampled_weight(self, w, idx, scale):
        return sampled_conv2d_weight(w, idx, scale, self._padding_plan()[1], self.stride, self.dilation,
                                     input_size=getattr(self, "_input_size", None))

    def extra_repr(self):
        return f"{super().extra_repr()}, seed={self.seed}"
