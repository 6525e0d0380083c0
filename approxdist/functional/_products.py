"""The two dense products the approximate ops are built from, each with its backward.

Both are written with the sampled dimension at dim 1 of input and weight (a linear
input is flattened to 2-D first), so one set of autograd Functions serves both.

`__call__`/`backward` are torch's own ops, used wherever the result must be bit-identical
to torch.nn (k == n, the dense gradients of 'blackbox'). `sampled`/`sampled_backward`
run on the gathered k-channel operands, where only speed matters: a pointwise (1x1,
stride 1, no padding) convolution is a batched matrix product there, which MKL runs
about twice as fast as oneDNN's NCHW convolution on CPU."""
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

    sampled = __call__
    sampled_backward = backward


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

    def _pointwise(self, w):
        return (w.shape[2] == 1 and w.shape[3] == 1 and tuple(self.stride) == (1, 1)
                and tuple(self.padding) == (0, 0))

    def sampled(self, x, w, b):
        if not self._pointwise(w) or x.dim() != 4 or not x.is_contiguous():
            return self(x, w, b)
        n_b, k, h, wd = x.shape
        out = torch.matmul(w.view(w.shape[0], k), x.view(n_b, k, h * wd))
        if b is not None:
            out += b.view(1, -1, 1)
        return out.view(n_b, w.shape[0], h, wd)

    def sampled_backward(self, g, x, w, has_bias, mask):
        if not self._pointwise(w) or x.dim() != 4 or not x.is_contiguous():
            return self.backward(g, x, w, has_bias, mask)
        n_b, k, h, wd = x.shape
        o, hw = w.shape[0], h * wd
        g3 = g.reshape(n_b, o, hw)
        x3 = x.view(n_b, k, hw)
        gx = gw = gb = None
        if mask[0]:
            gx = torch.matmul(w.view(o, k).t(), g3).view(x.shape)
        if mask[1]:
            if o * k < (o + k) * hw:  # per-sample products are small: sum them
                gw = torch.bmm(g3, x3.transpose(1, 2)).sum(0)
            else:  # one large product over (batch, pixels) beats summing B big ones
                gw = g3.transpose(0, 1).reshape(o, -1).mm(x3.transpose(0, 1).reshape(k, -1).t())
            gw = gw.view(w.shape)
        if mask[2] and has_bias:
            gb = g3.sum((0, 2))
        return gx, gw, gb

    def out_shape(self, x, w):
        def size(n, k, s, p, d):
            return (n + 2 * p - d * (k - 1) - 1) // s + 1

        h = size(x.shape[2], w.shape[2], self.stride[0], self.padding[0], self.dilation[0])
        wd = size(x.shape[3], w.shape[3], self.stride[1], self.padding[1], self.dilation[1])
        return (x.shape[0], w.shape[0], h, wd)
