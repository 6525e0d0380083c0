"""Sampled multi-head attention (nn/attention.py): the attention between the sampled
projections is torch's (float64, every mask and option, against nn.MultiheadAttention),
k == n and eval are bitwise torch's, the unbiased policies give unbiased outputs, state
dicts load into plain torch, the sparse hook stays lossless on a small torchvision ViT,
and the torchvision transformers sample nearly all of their weights."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import approxdist as ad
from approxdist.nn import (
    ApproxLinear,
    ApproxLinearDist,
    ApproxMultiheadAttention,
    ApproxMultiheadAttentionDist,
)
from approxdist.nn._mha import multi_head_attention
from approxdist.nn.budget import payload_fraction
from hookcompare import assert_hook_equals_allreduce

D = torch.float64
E, H = 8, 2
FORMS = [ApproxMultiheadAttention, ApproxMultiheadAttentionDist]


def _pair(cls, seed=0, **kw):
    """(plain nn.MultiheadAttention, the sampled form holding the same weights)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, dtype=D, **kw)
    with torch.no_grad():
        for p in ref.parameters():  # no zero biases: every term shows
            p.copy_(torch.randn_like(p))
    m = cls(E, H, dtype=D, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _inputs(batch_first, batched=True, seed=1, cross=False):
    g = torch.Generator().manual_seed(seed)
    shape = ((2, 5, E) if batch_first else (5, 2, E)) if batched else (5, E)
    q = torch.randn(shape, generator=g, dtype=D, requires_grad=True)
    if not cross:
        return q, q, q
    kshape = ((2, 4, E) if batch_first else (4, 2, E)) if batched else (4, E)
    return q, torch.randn(kshape, generator=g, dtype=D), torch.randn(kshape, generator=g, dtype=D)


MASKS = ["none", "bool_attn", "float_attn", "padding", "both", "causal", "per_head"]


def _masks(kind, batched, src):
    g = torch.Generator().manual_seed(3)
    attn = kpm = None
    if kind in ("bool_attn", "both"):
        attn = torch.rand(5, src, generator=g) < 0.3
        attn[:, 0] = False
    if kind == "float_attn":
        attn = torch.randn(5, src, generator=g, dtype=D)
    if kind == "per_head":
        attn = torch.randn(2 * H if batched else H, 5, src, generator=g, dtype=D)
    if kind in ("padding", "both"):
        kpm = torch.rand(2, src, generator=g) < 0.3 if batched else torch.rand(src, generator=g) < 0.3
        kpm[..., 0] = False
    if kind == "causal":
        attn = nn.Transformer.generate_square_subsequent_mask(5, dtype=D)
    return attn, kpm


OPTIONS = {"plain": {}, "bias_kv": {"add_bias_kv": True}, "zero_attn": {"add_zero_attn": True},
           "no_bias": {"bias": False}}
# (mask, options, shape): a causal mask needs as many keys as queries, a per-head mask a batch
CASES = [(mask, opt, shape) for mask in MASKS for opt in OPTIONS for shape in ("batched", "unbatched", "cross")
         if not (mask == "causal" and shape == "cross") and not (mask == "per_head" and shape == "unbatched")]


@pytest.mark.parametrize("mask, options, shape", CASES)
@pytest.mark.parametrize("batch_first, need_weights", [(False, True), (True, False), (True, True)])
def test_attention_between_projections_is_torchs(mask, options, shape, batch_first, need_weights):
    """The sampled forward's attention with exact projections (every feature kept)
    against nn.MultiheadAttention in float64: outputs, weights and gradients."""
    batched, cross = shape != "unbatched", shape == "cross"
    ref, m = _pair(ApproxMultiheadAttention, batch_first=batch_first, **OPTIONS[options])
    q, k, v = _inputs(batch_first, batched, cross=cross)
    src = k.shape[1] if (batch_first and batched) else k.shape[0]
    attn, kpm = _masks(mask, batched, src)
    kw = dict(key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn, is_causal=mask == "causal")
    out_ref, w_ref = ref(q, k, v, **kw)

    def full(x, part):
        return F.linear(x, *m._part(part))

    out, w = multi_head_attention(q, k, v, num_heads=H, project_in=full, project_out=m.out_proj,
                                  batch_first=batch_first, bias_k=m.bias_k, bias_v=m.bias_v,
                                  add_zero_attn=m.add_zero_attn, **kw)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert (w is None) == (w_ref is None)
    if w is not None:
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q] + list(m.parameters()), g)
    want = torch.autograd.grad(out_ref, [q] + list(ref.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", FORMS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_full_k_and_eval_are_bitwise_torch(cls, batch_first, need_weights):
    ref, m = _pair(cls, batch_first=batch_first, dropout=0.2)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    q, k, v = _inputs(batch_first)
    for train in (True, False):
        ref.train(train), m.train(train)
        torch.manual_seed(5)
        out_ref, w_ref = ref(q, k, v, need_weights=need_weights)
        torch.manual_seed(5)
        out, w = m(q, k, v, need_weights=need_weights)
        assert torch.equal(out, out_ref) and (w is None or torch.equal(w, w_ref))
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, list(m.parameters()), g),
                        torch.autograd.grad(out_ref, list(ref.parameters()), g)):
            assert torch.equal(a, b)
    m.sample_ratio, m.out_proj.sample_ratio = 0.5, 0.5
    m.eval()
    with torch.no_grad():  # eval stays exact when sampling is on (and torch may take its fast path)
        assert torch.equal(m(q, q, q)[0], ref(q, q, q)[0])
    plain = nn.MultiheadAttention(E, H, dtype=D, batch_first=batch_first)
    plain.load_state_dict(m.state_dict())  # torch loads the sampled module's weights


@pytest.mark.parametrize("cls", FORMS)
@pytest.mark.parametrize("mode", ["forward", "blackbox", "weight_grad"])
def test_sampled_training_touches_only_selected_features(cls, mode):
    ref, m = _pair(cls, batch_first=True)
    m.sample_ratio, m.out_proj.sample_ratio = 0.5, 0.5
    m.mode = m.out_proj.mode = mode
    q, k, v = _inputs(True)
    out, _ = m(q, k, v)
    out.square().sum().backward()
    for w in (m.in_proj_weight, m.out_proj.weight):
        used = (w.grad != 0).any(0).sum().item()
        if mode in ("forward", "weight_grad"):
            assert used == E // 2
        else:
            assert used == E
    if cls is ApproxMultiheadAttentionDist:
        assert m.last_indices.numel() == E // 2 and m.out_proj.last_indices.numel() == E // 2
        assert ad.nn.sampled_layer_of(m.in_proj_weight) is m
        assert ad.nn.sampled_layer_of(m.out_proj.weight) is m.out_proj


def _estimates(m, x, draws):
    outs = []
    for _ in range(draws):
        outs.append(m(x, x, x, need_weights=False)[0].detach())
    return torch.stack(outs)


@pytest.mark.parametrize("policy", ["random", "bernoulli", "uniform", "bernoulli_weight", "dist:bernoulli_weight"])
@pytest.mark.parametrize("which", ["in_proj", "out_proj"])
def test_unbiased_policies_give_unbiased_outputs(policy, which):
    """Sampling one projection with the other exact, the output is linear in the sampled
    product: the input projection's q and k thirds are zeroed (biases only), so every key
    scores the same and the output is out_proj(mean of v). The mean of many draws must
    lie within 5 standard errors (from the draws' own spread) of the exact output."""
    cls = ApproxMultiheadAttentionDist if policy.startswith("dist:") else ApproxMultiheadAttention
    ref, m = _pair(cls, batch_first=True)
    m.policy = m.out_proj.policy = policy.removeprefix("dist:")
    with torch.no_grad():
        m.in_proj_weight[:2 * E] = 0
    target = m if which == "in_proj" else m.out_proj
    target.sample_ratio = 0.4
    torch.manual_seed(0)
    x = _inputs(True)[0].detach()
    m.eval()
    exact = m(x, x, x, need_weights=False)[0]
    m.train()
    draws = 120
    est = _estimates(m, x, draws)
    spread = est.std(0)
    assert (spread > 0).any()  # it does sample
    err = (est.mean(0) - exact).abs()
    assert (err <= 5 * spread / math.sqrt(draws) + 1e-12).all(), (err / (spread / math.sqrt(draws))).max()


@pytest.mark.parametrize("distributed", [False, True])
def test_convert_model_samples_attention_and_keeps_state(distributed):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    original = copy.deepcopy(model)
    params = dict(model.named_parameters())
    ad.convert_model(model, 0.5, distributed=distributed)
    attn = model.encoder.layers[0].self_attention
    assert type(attn) is (ApproxMultiheadAttentionDist if distributed else ApproxMultiheadAttention)
    assert type(attn.out_proj) is (ApproxLinearDist if distributed else ApproxLinear)
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers keep working
    assert attn.in_proj_weight.is_contiguous() and attn.out_proj.weight.is_contiguous()
    assert list(model.state_dict()) == list(original.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    if distributed:
        seeds = [m.seed for m in model.modules() if isinstance(m, ad.nn.WeightSampled)]
        assert len(seeds) == len(set(seeds))


def _sampled_share(name, ratio=0.33, **kw):
    """(share of all parameters in sampled weights, analytic payload fraction, payload
    fraction of one training forward's selections) for a converted model."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    ad.convert_model(model, ratio, distributed=True)
    layers = [m for m in model.modules() if isinstance(m, ad.nn.WeightSampled)]
    dense = sum(p.numel() for p in model.parameters())
    sizes = [(m.weight.numel(), m.weight.shape[1]) for m in layers]
    analytic = payload_fraction(sizes, dense, [m.sample_ratio for m in layers])
    size = kw.get("image_size", 224)
    with torch.no_grad(), torch.enable_grad():
        model.train()(torch.randn(1, 3, size, size))
    sent = dense - sum(s for s, _ in sizes) + sum(s // n * m.pop_touched().numel() for (s, n), m in zip(sizes, layers))
    return sum(s for s, _ in sizes) / dense, analytic, sent / dense


TRANSFORMERS = [n for n in torchvision.models.list_models(module=torchvision.models)
                if n.startswith(("vit_", "swin_", "swin_v2_", "maxvit"))]


def _check_share(name):
    kw = {"image_size": 2 * int(name.rsplit("_", 1)[1])} if name.startswith("vit_") else {}
    share, analytic, sent = _sampled_share(name, **kw)
    assert share >= 0.95, share  # of every parameter, norms, biases and embeddings included
    assert abs(sent - analytic) <= 0.02 and analytic <= 0.36, (sent, analytic)


def test_vit_b_32_samples_its_attention():
    _check_share("vit_b_32")


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_torchvision_transformer_samples_nearly_all_weights(name):
    _check_share(name)


def test_sparse_hook_equals_allreduce_small_vit():
    r = assert_hook_equals_allreduce("vit_small")
    assert r["payload"] < 0.6 * r["dense_bytes"]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_swin_window_attention_calls_its_layers_and_is_torchvisions(v2, shift):
    """Swin's attention reads qkv/proj weights directly; convert_model swaps its class for
    one that calls them (nn/_swin.py). Its sampled forward with every feature kept is
    torchvision's in float64 (windows padded and shifted), and at ratio 0.5 the layers
    record their selections."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    from approxdist.nn._swin import _window_attention

    torch.manual_seed(0)
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    ref = cls(16, [4, 4], [shift, shift], num_heads=2).double()
    with torch.no_grad():
        ref.qkv.bias.copy_(torch.randn_like(ref.qkv.bias))
    block = nn.Sequential(copy.deepcopy(ref))
    ad.convert_model(block, 0.5, distributed=True)
    m = block[0]
    assert type(m).__name__ == "Sampled" + cls.__name__ and m.qkv.weight.is_contiguous()
    assert list(m.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 6, 7, 16, dtype=D, requires_grad=True)  # pads to 8x8: 4 windows
    want = ref(x)
    sampled = [layer for layer in m.modules() if isinstance(layer, ad.nn.WeightSampled)]  # V2: cpb_mlp too
    for layer in sampled:
        layer.sample_ratio = 1.0
    m.eval()
    assert torch.equal(m(x), want)  # torchvision's own forward
    m.train()
    got = _window_attention(m, x, m.get_relative_position_bias(), getattr(m, "logit_scale", None))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [x] + list(m.parameters()), g),
                    torch.autograd.grad(want, [x] + list(ref.parameters()), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for layer in sampled:
        layer.sample_ratio = 0.5
    m(x).sum().backward()
    for layer in (m.qkv, m.proj):
        assert (layer.weight.grad != 0).any(0).sum() == 8 and layer.last_indices.numel() == 8
