"""Multi-head attention with the projections supplied by the caller.

nn.MultiheadAttention computes its q/k/v input projection inside
F.multi_head_attention_forward with the packed `in_proj_weight`, out of reach of a
sampled product. This is the same computation (the semantics of torch's slow path:
masks, bias_k/bias_v, add_zero_attn, dropout, need_weights, is_causal) with the two
projections as callables, so the sampled attention modules (attention.py) can run them
over sampled input features. The exact forward (eval, k == n) is nn.MultiheadAttention's
own, so it stays bit-identical to torch.
"""
import math

import torch
import torch.nn.functional as F


def _float_mask(mask, name, dtype):
    """A bool mask as an additive float mask (-inf where True); a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return mask


def multi_head_attention(query, key, value, *, num_heads, project_in, project_out, batch_first,
                         bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
                         key_padding_mask=None, need_weights=True, attn_mask=None,
                         average_attn_weights=True, is_causal=False):
    """(output, attention weights or None) as nn.MultiheadAttention.forward returns them.

    project_in(x, part): the input projection of x; part None is the whole packed
    projection (3E outputs, for self-attention), 0/1/2 the q/k/v third.
    project_out(x): the output projection of the (L * N, E) attention output."""
    batched = query.dim() == 3
    self_attention = query is key and key is value  # nn.MultiheadAttention's own test
    if batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
    if is_causal and attn_mask is None:
        raise ValueError("is_causal=True needs attn_mask (as nn.MultiheadAttention does)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        is_causal = False

    # the in-projection: one packed product for self-attention, else one per part
    if self_attention:
        q, k, v = project_in(query, None).unflatten(-1, (3, embed_dim)).unbind(-2)
    else:
        q, k, v = project_in(query, 0), project_in(key, 1), project_in(value, 2)

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = k.new_zeros((bsz * num_heads, 1, head_dim))
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        kpm = kpm.reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm

    if need_weights:
        scores = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
        else:
            scores = torch.bmm(scores, k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else \
                attn_mask.view(bsz, num_heads, -1, src_len)
        q, k, v = (t.view(bsz, num_heads, -1, head_dim) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        weights = None
    out = project_out(out).view(tgt_len, bsz, -1)
    if not batched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    return out, weights
