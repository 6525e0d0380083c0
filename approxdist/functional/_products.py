"""The two dense products the approximate ops are built from, each with its backward.

Both are written with the sampled dimension at dim 1 of input and weight (a linear
input is flattened to 2-D first), so one set of autograd Functions serves both."""
import torch
import torch.nn.functional as F


class LinearProduct:
    """y = x @ w.T + b with x (M, I), w (O, I)."""

    def __call__(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, g, x, w, has_bias, mask):
        gx = g.mm(w) if mask[0] else None
        gw = g.t().mm(x) if mask[1] else None
        gb = g.sum(0) if (mask[2] and has_bias) else None
        return gx, gw, gb

    def out_shape(self, x, w):
        return (x.shape[0], w.shape[0])


class Conv2dProduct:
    """2-D cross-correlation with groups=1 (the sampled dim is the input channel)."""

    def __init__(self, stride, padding, dilation):
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, 1)

    def backward(self, g, x, w, has_bias, mask):
        bias_sizes = [w.shape[0]] if has_bias else None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, bias_sizes, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], 1, [bool(mask[0]), bool(mask[1]), bool(mask[2] and has_bias)])
        return gx, gw, gb

    def out_shape(self, x, w):
        def size(n, k, s, p, d):
            return (n + 2 * p - d * (k - 1) - 1) // s + 1

        h = size(x.shape[2], w.shape[2], self.stride[0], self.padding[0], self.dilation[0])
        wd = size(x.shape[3], w.shape[3], self.stride[1], self.padding[1], self.dilation[1])
        return (x.shape[0], w.shape[0], h, wd)
