"""Names and positional arguments of the original NeurIPS 2021 code, so scripts written
for it run unchanged: approx_Linear, approx_Conv2d and approx_Conv2d_dist."""
from .conv import ApproxConv2d, ApproxConv2dDist
from .linear import ApproxLinear


class approx_Linear(ApproxLinear):  # noqa: N801 (the seed's name)
    def __init__(self, in_features, out_features, bias=True, sample_ratio=1.0, minimal_k=1, **kwargs):
        super().__init__(in_features, out_features, bias, sample_ratio=sample_ratio,
                         minimal_k=minimal_k, **kwargs)


class approx_Conv2d(ApproxConv2d):  # noqa: N801
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", sample_ratio=1.0, minimal_k=1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, sample_ratio=sample_ratio, minimal_k=minimal_k, **kwargs)


class approx_Conv2d_dist(ApproxConv2dDist):  # noqa: N801
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", sample_ratio=1.0, minimal_k=1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, sample_ratio=sample_ratio, minimal_k=minimal_k, **kwargs)
