"""torchvision's Swin attention with its qkv and proj projections sampled.

ShiftedWindowAttention(V2).forward passes `self.qkv.weight` and `self.proj.weight` to
torchvision's shifted_window_attention function, which applies them with F.linear: a
sampled qkv/proj layer would be bypassed (its gradient dense, but the hook sending only
its selection). convert_model therefore swaps the attention module's class for the one
here (same attributes, Parameters and state_dict: plain torchvision loads it), whose
training forward calls the two layers as modules, so they sample and record like any
other; eval, and training where neither samples, run torchvision's own forward (the two
weights stay row-major, so that is bit-identical). Loaded only when a model has them.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2


def _samples(layer):
    return hasattr(layer, "samples_weight") and layer.samples_weight()


def _window_attention(self, input, relative_position_bias, logit_scale=None):
    """torchvision's shifted_window_attention with self.qkv and self.proj called as modules."""
    window_size, num_heads = self.window_size, self.num_heads
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(self.shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    qkv = self.qkv(x)
    if logit_scale is not None and self.qkv.bias is not None:
        # V2 has no key bias: torchvision zeroes that third of the bias before F.linear
        length = self.qkv.bias.numel() // 3
        qkv = torch.cat([qkv[..., :length], qkv[..., length:2 * length] - self.qkv.bias[length:2 * length],
                         qkv[..., 2 * length:]], dim=-1)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=self.attention_dropout, training=self.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class _SampledWindows:
    def forward(self, x):
        layers = (self.qkv, self.proj)
        if self.training and any(_samples(m) for m in layers):
            logit_scale = getattr(self, "logit_scale", None)
            return _window_attention(self, x, self.get_relative_position_bias(), logit_scale)
        for m in layers:  # torchvision's forward reads the weights without calling the layers
            if hasattr(m, "_record"):
                if self.training:
                    m._record(None, torch.is_grad_enabled())
                else:
                    m._note_dense_use()
        return super().forward(x)


class SampledShiftedWindowAttention(_SampledWindows, ShiftedWindowAttention):
    pass


class SampledShiftedWindowAttentionV2(_SampledWindows, ShiftedWindowAttentionV2):
    pass


SAMPLED = {ShiftedWindowAttention: SampledShiftedWindowAttention,
           ShiftedWindowAttentionV2: SampledShiftedWindowAttentionV2}
