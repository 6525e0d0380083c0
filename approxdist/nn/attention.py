"""nn.MultiheadAttention with its projections sampled over their input features.

nn.MultiheadAttention keeps the q/k/v input projection in one packed Parameter,
`in_proj_weight` (3E, E), not in an nn.Linear, so converting the Linear layers alone
leaves most of a ViT's weights exact. These subclasses keep every Parameter, state_dict
key and value (plain torch loads their weights) and, in training, compute both
projections with column-row sampling over the E input features: the input projection
with one selection over the packed weight's columns (the q, k and v thirds use the same
features), the output projection as the sampled Linear it becomes (`out_proj`). The
attention between them (softmax, masks, dropout) is exact (_mha.py). Eval mode, and
training where no projection samples, run nn.MultiheadAttention's own forward, so they
are bit-identical to torch.

The input projection's weight is the module's `weight` (a property over in_proj_weight):
the distributed form is a WeightSampled layer like ApproxLinearDist, found by the comm
hook through that Parameter. Both projection weights stay in torch's row-major layout
(weight_layout 'contiguous'): nn.MultiheadAttention's exact forward reads them directly,
and an input-major weight would change its summation order. Attention built with
kdim/vdim different from embed_dim (separate q/k/v weights) is not sampled.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import approx_linear, sampled_linear, sampled_linear_weight
from ._config import SamplingConfig
from ._dist import WeightSampled
from ._mha import multi_head_attention
from .linear import ApproxLinear, ApproxLinearDist


class _SampledAttention:
    """What the two forms share: the `weight` view of the input projection, the exact
    forward, and the call into the sampled one."""

    @property
    def weight(self):
        return self.in_proj_weight

    def _check_packed(self):
        if not self._qkv_same_embed_dim:
            raise ValueError("sampled attention needs kdim and vdim equal to embed_dim (one packed "
                             f"in_proj_weight), got kdim={self.kdim}, vdim={self.vdim}")

    def _part(self, part):
        """(weight, bias) of the whole input projection (part None) or its q/k/v third."""
        w, b = self.in_proj_weight, self.in_proj_bias
        if part is None:
            return w, b
        e = self.embed_dim
        return w[part * e:(part + 1) * e], None if b is None else b[part * e:(part + 1) * e]

    def _sampled_forward(self, query, key, value, project_in, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal):
        return multi_head_attention(
            query, key, value, num_heads=self.num_heads, project_in=project_in, project_out=self.out_proj,
            batch_first=self.batch_first, bias_k=self.bias_k, bias_v=self.bias_v,
            add_zero_attn=self.add_zero_attn, dropout_p=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {self._sampling_repr()}"


def _attention_args(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first):
    return (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)


class ApproxMultiheadAttention(_SampledAttention, SamplingConfig, nn.MultiheadAttention):
    """nn.MultiheadAttention whose training forward samples the in_features of its input
    and output projections (the output projection is an ApproxLinear with the same
    settings); eval is exact."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, *, sample_ratio=1.0, minimal_k=1, policy="topk",
                 mode="forward", device=None, dtype=None):
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(*_attention_args(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                                          kdim, vdim, batch_first), device=device, dtype=dtype)
        self._check_packed()
        old = self.out_proj
        self.out_proj = ApproxLinear(embed_dim, embed_dim, bias, sample_ratio=sample_ratio, minimal_k=minimal_k,
                                     policy=policy, mode=mode, weight_layout="contiguous", device="meta")
        self.out_proj.weight, self.out_proj.bias = old.weight, old.bias

    def _project_in(self, x, part):
        w, b = self._part(part)
        return approx_linear(x, w, b, sample_ratio=self.sample_ratio, minimal_k=self.minimal_k,
                             policy=self.policy, mode=self.mode)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.training or not (self.samples_weight() or self.out_proj.samples_weight()):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        return self._sampled_forward(query, key, value, self._project_in, key_padding_mask, need_weights,
                                     attn_mask, average_attn_weights, is_causal)


class ApproxMultiheadAttentionDist(_SampledAttention, WeightSampled, nn.MultiheadAttention):
    """ApproxMultiheadAttention for data-parallel training: the input projection selects
    its features from in_proj_weight (and a generator seeded with `seed`) as
    ApproxLinearDist does, so every rank picks the same ones, and `out_proj` is an
    ApproxLinearDist seeded `seed + 1`. `last_indices` are the input projection's."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, *, sample_ratio=1.0, minimal_k=1,
                 policy="topk_weight", mode="forward", seed=0, explore=0.1, device=None, dtype=None):
        self._init_sampling(sample_ratio, minimal_k, policy, mode)
        super().__init__(*_attention_args(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                                          kdim, vdim, batch_first), device=device, dtype=dtype)
        self._check_packed()
        old = self.out_proj
        self.out_proj = ApproxLinearDist(embed_dim, embed_dim, bias, sample_ratio=sample_ratio,
                                         minimal_k=minimal_k, policy=policy, mode=mode, seed=seed + 1,
                                         weight_layout="contiguous", explore=explore, device="meta")
        self.out_proj.weight, self.out_proj.bias = old.weight, old.bias
        self.out_proj._init_dist(seed + 1, "contiguous", explore)  # registers the weight it now holds
        self._init_dist(seed, "contiguous", explore)

    def _sampled_weight(self, w, idx, scale):
        return sampled_linear_weight(w, idx, scale)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        args = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not self.training:
            self._note_dense_use()
            self.out_proj._note_dense_use()
            return super().forward(query, key, value, *args)
        # (a forward recording no gradient leaves the selection streams alone: _dist.py)
        records = self._records_grad(query) or (torch.is_grad_enabled()
                                                and (key.requires_grad or value.requires_grad))
        idx, scale, prepared = self._selection(records)
        self._record(idx, records)
        if idx is None and not self.out_proj.samples_weight():
            self.out_proj._record(None, records)  # nn.MultiheadAttention reads out_proj's weight directly
            return super().forward(query, key, value, *args)

        def project_in(x, part):
            w, b = self._part(part)
            if idx is None:
                return F.linear(x, w, b)
            return sampled_linear(x, w, b, idx, scale, self.mode,
                                  prepared_weight=prepared if part is None else None)

        return self._sampled_forward(query, key, value, project_in, *args)

    def extra_repr(self):
        return f"{super().extra_repr()}, seed={self.seed}"
