"""Autograd Functions for the sampling modes.

Forward sampling computes the product over the k selected pairs and, in backward,
computes only the gradient slices of those pairs, written into zero-filled full-size
gradients with plain copies (indices are unique, so no atomic adds as in the backward
of index_select). It keeps the k-channel operands from the forward instead of the full
ones, so it also saves memory.
"""
import torch

from ._layout import (
    dim1_major,
    dim1_major_strides,
    dim1_outer,
    select_dim1,
    zeros_like_layout,
)
from ._products import _scatter
from .sampling import select_columns


def _scale_view(scale, like, dim):
    shape = [1] * like.dim()
    shape[dim] = -1
    return scale.to(like.dtype).view(shape)


def sampled_weight(w, idx, scale, product):
    """The weight operand of the pairs idx as the product takes it (weight_operand),
    scaled: what a sampled forward multiplies with, and keeps for its backward."""
    w_s = product.weight_operand(select_dim1(w, idx))
    if scale is not None:
        w_s = w_s * _scale_view(scale, w_s, 1)
    return w_s


class ForwardSampled(torch.autograd.Function):
    """Sampled forward; backward through the sampled pairs (dense_grad=False) or, for the
    'blackbox' mode, the exact gradients of the dense product (dense_grad=True)."""

    @staticmethod
    def forward(ctx, x, w, b, idx, scale, product, dense_grad, w_s):
        # w_s: sampled_weight(w, idx, scale, product), when made ahead (prepared_weight)
        x_s = product.take(x, idx, w)
        if w_s is None:
            w_s = sampled_weight(w, idx, scale, product)
        if idx.numel():
            out = product.sampled(x_s, w_s, b)
        else:  # nothing drawn (possible under Bernoulli sampling): the estimate is the bias
            out = x.new_zeros(product.out_shape(x, w))
            if b is not None:
                out += b.view([1, -1] + [1] * (out.dim() - 2))
        if out._base is not None:
            # A view returned from a custom Function cannot be modified in place (autograd
            # forbids it), and models do that right after a convolution (inplace
            # activations, squeeze-excitation). The products return fresh tensors; this
            # copy only guards a product that does not.
            out = out.clone()
        ctx.product, ctx.dense_grad, ctx.has_bias = product, dense_grad, b is not None
        ctx.x_shape, ctx.w_shape = x.shape, w.shape
        # The weight gradient is built in the weight's own layout (a dim-1-major weight
        # of the distributed layers), so AccumulateGrad and DDP take it without a copy;
        # dim-1-major too for a weight whose dim 1 is outer (one tap of such a weight,
        # Conv2dProduct.reduce), so its blocks are scattered whole.
        ctx.w_stride = w.stride() if dim1_major(w) else dim1_major_strides(w.shape) if dim1_outer(w) else None
        if dense_grad:
            ctx.save_for_backward(x, w)
        else:
            ctx.save_for_backward(x_s, w_s, idx, scale)
        return out

    @staticmethod
    def backward(ctx, g):
        mask = ctx.needs_input_grad[:3]
        if ctx.dense_grad:
            x, w = ctx.saved_tensors
            gx, gw, gb = ctx.product.backward(g, x, w, ctx.has_bias, mask)
            return gx, gw, gb, None, None, None, None, None
        x_s, w_s, idx, scale = ctx.saved_tensors
        if idx.numel() == 0:
            gb = g.sum([d for d in range(g.dim()) if d != 1]) if (mask[2] and ctx.has_bias) else None
            gx = g.new_zeros(ctx.x_shape) if mask[0] else None
            gw = zeros_like_layout(ctx.w_shape, ctx.w_stride, g) if mask[1] else None
            return gx, gw, gb, None, None, None, None, None
        gx_s, gw_s, gb = ctx.product.sampled_backward(g, x_s, w_s, ctx.has_bias, mask)
        gx = ctx.product.put(ctx.x_shape, idx, gx_s, w_s) if mask[0] else None
        gw = None
        if mask[1]:
            if scale is not None:
                gw_s = gw_s * _scale_view(scale, gw_s, 1)
            gw = _scatter(ctx.w_shape, idx, gw_s, stride=ctx.w_stride)
        return gx, gw, gb, None, None, None, None, None


class WeightGradSampled(torch.autograd.Function):
    """Mode 'weight_grad': the exact product forward and the exact input gradient, the
    exact bias gradient (the same sum, in another order: fp32 rounding), and the weight
    gradient of the selected input channels only (scaled where the policy scales), zero
    elsewhere. A convolution's forward and input gradient are torch's bit for bit (on a
    row-major copy of the weight); a linear layer's take the weight as stored
    (product.exact_weight: BLAS reads a dim-1-major matrix as it is, where a copy would
    cost as much as the product at a few hundred tokens), so they equal nn.Linear's up
    to the summation order of the kernel BLAS picks for that layout. The gradient of
    every weight slice it keeps is the true one, so the model trains the function that
    eval runs (and BatchNorm sees the exact activations); what it saves is the weight
    gradient's compute on the other channels and, under the sparse hook, their traffic."""

    @staticmethod
    def forward(ctx, x, w, b, idx, scale, product):
        w_c = product.exact_weight(w)  # (w itself for a linear or a row-major weight)
        out = product(x, w_c, b)
        ctx.product, ctx.has_bias = product, b is not None
        ctx.w_shape = w.shape
        ctx.w_stride = w.stride() if dim1_major(w) else None
        # the row-major copy is kept for the input gradient rather than made again there
        ctx.save_for_backward(x, w, w_c, idx, scale)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, w_c, idx, scale = ctx.saved_tensors
        mask = ctx.needs_input_grad[:3]
        product = ctx.product
        gx = gb = None
        # torch's own input gradient, asked alone: asked with the bias gradient, oneDNN
        # computes the whole weight gradient as well (see Conv2dProduct.bias_backward)
        if mask[0]:
            gx = product.backward(g, x, w_c, False, (True, False, False))[0]
        if mask[2] and ctx.has_bias:
            gb = product.bias_backward(g)
        gw = None
        if mask[1]:
            if idx.numel() == 0:
                gw = zeros_like_layout(ctx.w_shape, ctx.w_stride, g)
            else:
                gw_s = product.sampled_weight_grad(g, x, w, idx)
                if scale is not None:
                    gw_s = gw_s * _scale_view(scale, gw_s, 1)
                gw = _scatter(ctx.w_shape, idx, gw_s, stride=ctx.w_stride)
        return gx, gw, gb, None, None, None


def _norms_except(t, dim):
    other = [d for d in range(t.dim()) if d != dim]
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dim=other, dtype=dtype)


class BackwardSampled(torch.autograd.Function):
    """Exact forward; the backward products are sampled: the input gradient over the
    output channels/features, the weight gradient over the batch rows."""

    @staticmethod
    def forward(ctx, x, w, b, k_out, k_batch, policy, generator, product):
        out = product(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.k_out, ctx.k_batch, ctx.policy, ctx.generator = k_out, k_batch, policy, generator
        ctx.product, ctx.has_bias = product, b is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        product = ctx.product
        gx = gw = gb = None
        if ctx.needs_input_grad[2] and ctx.has_bias:
            gb = g.sum([d for d in range(g.dim()) if d != 1])
        if ctx.needs_input_grad[0]:
            n_out = w.shape[0]
            if ctx.k_out >= n_out:
                gx = product.backward(g, x, w, False, (True, False, False))[0]
            else:
                scores = _norms_except(g, 1) * _norms_except(w, 0)
                idx, scale = select_columns(scores, ctx.k_out, ctx.policy, ctx.generator)
                w_o = w.index_select(0, idx)
                if scale is not None:
                    w_o = w_o * _scale_view(scale, w_o, 0)
                if idx.numel():
                    gx = product.backward(g.index_select(1, idx), x, w_o, False, (True, False, False))[0]
                else:
                    gx = torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            n_batch = x.shape[0]
            if ctx.k_batch >= n_batch:
                gw = product.backward(g, x, w, False, (False, True, False))[1]
            else:
                scores = _norms_except(x, 0) * _norms_except(g, 0)
                idx, scale = select_columns(scores, ctx.k_batch, ctx.policy, ctx.generator)
                g_b = g.index_select(0, idx)
                if scale is not None:
                    g_b = g_b * _scale_view(scale, g_b, 0)
                if idx.numel():
                    gw = product.backward(g_b, x.index_select(0, idx), w, False, (False, True, False))[1]
                else:
                    gw = torch.zeros_like(w)
        return gx, gw, gb, None, None, None, None, None
