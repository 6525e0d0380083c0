"""The two dense products the approximate ops are built from, each with its backward.

Both are written with the sampled dimension at dim 1 of input and weight (a linear
input is flattened to 2-D first), so one set of autograd Functions serves both.

`__call__`/`backward` are torch's own ops, used wherever the result must be bit-identical
to torch.nn (k == n, the dense gradients of 'blackbox'). `take`, `sampled`,
`sampled_backward` and `put` work on the k selected channels, where only speed matters:
a 1x1 convolution without padding is a batched matrix product there (a strided one
first drops the pixels it skips), which MKL runs up to twice as fast as oneDNN's NCHW
convolution on CPU.
"""
import torch
import torch.nn.functional as F

from ._layout import contiguous_weight, dim1_major, dim1_major_strides, select_dim1, zeros_like_layout

_CONV_BACKWARD = torch.ops.aten.convolution_backward.default

# Below this many pixels a 1x1 convolution folds the batch into one matrix product:
# B small products lose to one large one plus two transposing copies.
_FOLD_BELOW = 64


def _scatter(full_shape, idx, part, dim=1, stride=None):
    """A zero tensor of full_shape (with `stride` when given) with `part` at the (unique)
    indices along dim: plain copies, no atomic adds as in the backward of index_select.
    A dim-1-major result (a distributed layer's weight gradient) is built block by
    block (see _scatter_blocks); index_copy_ along its outer dim 1 would be elementwise."""
    if dim == 1 and stride is not None and len(full_shape) >= 2 \
            and tuple(stride) == dim1_major_strides(full_shape):
        return _scatter_blocks(full_shape, idx, part)
    out = zeros_like_layout(full_shape, stride, part)
    out.index_copy_(dim, idx, part)
    return out


def _scatter_blocks(full_shape, idx, part):
    """_scatter into a dim-1-major result: every input channel is one block of memory.

    The k blocks of `part` and one zero block go into a (k + 1)-row buffer, and each
    channel's block is then gathered from it (index_select along the rows of a
    contiguous matrix copies whole rows). Every output element is written once, instead
    of a zero fill of the whole gradient followed by an elementwise index_copy_: 1.3-2x
    faster for resnet weights."""
    n, k = full_shape[1], idx.numel()
    swapped = (n, full_shape[0]) + tuple(full_shape[2:])
    rows = part.new_empty((k + 1,) + swapped[1:])
    rows[:k].copy_(part.transpose(0, 1))
    rows[k].zero_()
    where = torch.full((n,), k, dtype=torch.long, device=idx.device)
    where[idx] = torch.arange(k, device=idx.device)
    return rows.view(k + 1, -1).index_select(0, where).view(swapped).transpose(0, 1)


def _mm_like(w, a, b):
    """a @ b, laid out like the weight w: for a dim-1-major w computed as (b.T @ a.T).T,
    which is the same matrix product (bitwise equal only up to summation order), so the
    gradient is already dim-1-major and is scattered as whole blocks."""
    if dim1_major(w):
        return b.t().mm(a.t()).t()
    return a.mm(b)


class LinearProduct:
    """y = x @ w.T + b with x (M, I), w (O, I)."""

    def __call__(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, g, x, w, has_bias, mask):
        gx = g.mm(w) if mask[0] else None
        gw = g.t().mm(x) if mask[1] else None
        gb = self.bias_backward(g) if (mask[2] and has_bias) else None
        return gx, gw, gb

    def bias_backward(self, g):
        """torch's bias gradient alone."""
        return g.sum(0)

    def sampled_backward(self, g, x, w, has_bias, mask):
        gx = g.mm(w) if mask[0] else None
        gw = _mm_like(w, g.t(), x) if mask[1] else None
        gb = self.bias_backward(g) if (mask[2] and has_bias) else None
        return gx, gw, gb

    def out_shape(self, x, w):
        return (x.shape[0], w.shape[0])

    def exact_weight(self, w):
        """The weight as the exact product takes it in mode 'weight_grad': as stored (a
        dim-1-major weight is a transposed matrix to BLAS, no copy)."""
        return w

    def sampled_weight_grad(self, g, x, w, idx):
        """The weight gradient of the input features idx, laid out like w: the product
        reads g and the selected columns of x, never the weight."""
        return _mm_like(w, g.t(), self.take(x, idx))

    def weight_operand(self, w_s):
        """The sampled weight as the products take it: BLAS reads a transposed
        (dim-1-major) matrix as it is."""
        return w_s

    def take(self, x, idx, w=None):
        return x.index_select(1, idx)

    def put(self, full_shape, idx, gx_s, w=None):
        return _scatter(full_shape, idx, gx_s)

    sampled = __call__

    def reduce(self, size):
        return None


class _TapWeight(torch.autograd.Function):
    """w[:, :, i:i+1, j:j+1], whose gradient comes back in w's layout: zeros but at the
    tap (autograd's own slice backward would build it row-major)."""

    @staticmethod
    def forward(ctx, w, i, j):
        ctx.shape, ctx.stride, ctx.tap = w.shape, w.stride(), (i, j)
        return w[:, :, i:i + 1, j:j + 1]

    @staticmethod
    def backward(ctx, g):
        i, j = ctx.tap
        gw = zeros_like_layout(ctx.shape, ctx.stride, g)
        gw[:, :, i:i + 1, j:j + 1] = g
        return gw, None, None


class Conv2dProduct:
    """2-D cross-correlation with groups=1 (the sampled dim is the input channel)."""

    def __init__(self, stride, padding, dilation, kernel=None):
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.kernel = None if kernel is None else tuple(kernel)  # (kh, kw), for reduce

    def __call__(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, 1)

    def backward(self, g, x, w, has_bias, mask):
        bias_sizes = [w.shape[0]] if has_bias else None
        gx, gw, gb = _CONV_BACKWARD(
            g, x, w, bias_sizes, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], 1, [bool(mask[0]), bool(mask[1]), bool(mask[2] and has_bias)])
        return gx, gw, gb

    def bias_backward(self, g):
        """The bias gradient alone: the sum of g over all but the channels. Not torch's
        own bits: oneDNN computes a convolution's bias gradient only beside its weight
        gradient, so asking it for the input and bias gradients computes the whole weight
        gradient too (the layer's full backward: 11.7 ms against 4.9 ms for the input
        gradient alone, 32x128x8x8 -> 256, 3x3, one thread), and its sum taken over fewer
        channels is not bitwise the same either (it splits the sum by shape and thread
        count). This sum differs from torch's by fp32 rounding only."""
        return g.sum((0, 2, 3))

    def out_shape(self, x, w):
        def size(n, k, s, p, d):
            return (n + 2 * p - d * (k - 1) - 1) // s + 1

        h = size(x.shape[2], w.shape[2], self.stride[0], self.padding[0], self.dilation[0])
        wd = size(x.shape[3], w.shape[3], self.stride[1], self.padding[1], self.dilation[1])
        return (x.shape[0], w.shape[0], h, wd)

    def reduce(self, size):
        """For inputs of spatial `size` whose output is one pixel read by a single tap
        (every other tap falls in the padding): (take_input, take_weight, product) of the
        same result as a 1x1 convolution of that pixel with that tap, else None. Resnet's
        last 3x3 convolutions on 32 px images are such: a ninth of the work, and a ninth
        of the weight gathered. Where several taps read the image, gathering them costs
        more than the convolution saves (measured on resnet18's layer4.0.conv1)."""
        tap = self._tap(size)
        if tap is None:
            return None
        (i, j), (r, c) = tap
        return (lambda x: x[:, :, r:r + 1, c:c + 1],
                lambda w: _TapWeight.apply(w, i, j),
                Conv2dProduct((1, 1), (0, 0), (1, 1)))

    def _tap(self, size):
        """((i, j) of the only tap that reads the image, (row, column) of the pixel it
        reads) where the output is one pixel, else None."""
        if self.kernel is None or self.kernel[0] * self.kernel[1] == 1:
            return None
        tap, pixel = [], []
        for n, p, d, k, s in zip(size, self.padding, self.dilation, self.kernel, self.stride):
            if (n + 2 * p - d * (k - 1) - 1) // s != 0:  # not one output pixel
                return None
            read = [i for i in range(k) if 0 <= i * d - p < n]
            if len(read) != 1:
                return None
            tap.append(read[0])
            pixel.append(read[0] * d - p)
        return tuple(tap), tuple(pixel)

    def exact_weight(self, w):
        """The weight as the exact product takes it in mode 'weight_grad': a row-major copy
        of a dim-1-major weight, so the forward and input gradient are torch's bit for bit
        (oneDNN would copy it anyway)."""
        return contiguous_weight(w)

    # -- the k selected channels ----------------------------------------------------------
    def sampled_weight_grad(self, g, x, w, idx):
        """The weight gradient of the input channels idx (convolution_backward takes the
        sampled weight for its shape and layout)."""
        w_s = self.weight_operand(select_dim1(w, idx))
        return self.sampled_backward(g, self.take(x, idx, w_s), w_s, False, (False, True, False))[1]

    def weight_operand(self, w_s):
        """The sampled weight as the products take it, made once in the forward and kept
        for the backward: a row-major copy for a convolution (oneDNN would copy a
        dim-1-major weight to row-major in the forward and again in the backward), the
        weight as it is for a 1x1 convolution (a matrix product, see sampled)."""
        return w_s if self._pointwise(w_s) else w_s.contiguous()

    def _pointwise(self, w):
        return w.shape[2] == 1 and w.shape[3] == 1 and self.padding == (0, 0)

    def _strided(self):
        return self.stride != (1, 1)

    def take(self, x, idx, w=None):
        """The selected input channels; a strided 1x1 convolution keeps only the pixels
        it reads, so its operand is a stride-1 one (gathered in the same copy)."""
        if w is not None and self._pointwise(w) and self._strided():
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        return x.index_select(1, idx)

    def put(self, full_shape, idx, gx_s, w=None):
        if w is not None and self._pointwise(w) and self._strided():
            out = gx_s.new_zeros(full_shape)
            out[:, :, ::self.stride[0], ::self.stride[1]].index_copy_(1, idx, gx_s)
            return out
        return _scatter(full_shape, idx, gx_s)

    def sampled(self, x, w, b):
        """The product over taken operands (see take)."""
        if not self._pointwise(w):
            return self(x, w, b)
        n_b, k, h, wd = x.shape
        o, hw = w.shape[0], h * wd
        w2 = w.reshape(o, k)  # a view (transposed for a dim-1-major w: BLAS takes it as is)
        # Written into a tensor of the output's own shape: a view returned from the
        # autograd Function could not be modified in place (an inplace ReLU after it).
        out = x.new_empty((n_b, o, h, wd))
        out3 = out.view(n_b, o, hw)
        if hw < _FOLD_BELOW:
            folded = w2.mm(x.transpose(0, 1).reshape(k, n_b * hw))
            out3.copy_(folded.view(o, n_b, hw).transpose(0, 1))
        else:
            torch.matmul(w2, x.view(n_b, k, hw), out=out3)
        if b is not None:
            out3 += b.view(1, -1, 1)
        return out

    def sampled_backward(self, g, x, w, has_bias, mask):
        if not self._pointwise(w):
            return self.backward(g, x, w, has_bias, mask)
        n_b, k, h, wd = x.shape
        o, hw = w.shape[0], h * wd
        fold = hw < _FOLD_BELOW
        g3 = g.reshape(n_b, o, hw)
        x3 = x.view(n_b, k, hw)
        g_folded = g3.transpose(0, 1).reshape(o, n_b * hw) if (fold or o * k >= (o + k) * hw) else None
        gx = gw = gb = None
        if mask[0]:
            w2t = w.reshape(o, k).t()
            if fold:
                gx = w2t.mm(g_folded).view(k, n_b, hw).transpose(0, 1).contiguous()
            else:
                gx = torch.matmul(w2t, g3)
            gx = gx.view(x.shape)
        if mask[1]:
            if g_folded is None:  # per-sample products are small next to the images: sum them
                if dim1_major(w):  # computed transposed, so it comes out dim-1-major
                    gw = torch.bmm(x3, g3.transpose(1, 2)).sum(0).t()
                else:
                    gw = torch.bmm(g3, x3.transpose(1, 2)).sum(0)
            else:  # one product over (batch, pixels) beats summing B large ones
                gw = _mm_like(w, g_folded, x3.transpose(0, 1).reshape(k, n_b * hw).t())
            gw = gw.view(w.shape)
        if mask[2] and has_bias:
            gb = g3.sum((0, 2))
        return gx, gw, gb
