"""The modules: exact in eval mode and at k == n (bit for bit, against torch.nn), the
selection of the *Dist forms (sorted last_indices, weight-driven, seeded), the
seed-compatible aliases and the attributes that change between steps."""
import copy

import pytest
import torch
import torch.nn as nn

from approxdist.nn import (
    ApproxConv2d,
    ApproxConv2dDist,
    ApproxLinear,
    ApproxLinearDist,
    approx_Conv2d,
    approx_Conv2d_dist,
    approx_Linear,
)

CONV_KW = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, bias=False),
           dict(kernel_size=(3, 1), padding=(1, 0), dilation=2), dict(kernel_size=1, stride=2),
           dict(kernel_size=3, padding="same", dilation=2), dict(kernel_size=4, padding="same"),
           dict(kernel_size=3, padding="valid"), dict(kernel_size=3, padding=1, padding_mode="reflect"),
           dict(kernel_size=3, padding=2, padding_mode="circular", bias=False)]


def _twins(cls, ref_cls, *args, **kw):
    """An approximate module and a torch.nn one with the same parameters."""
    torch.manual_seed(0)
    ref = ref_cls(*args, **{k: v for k, v in kw.items() if k not in ("sample_ratio", "minimal_k", "policy")})
    ref = ref.double()
    new = cls(*args, **kw).double()
    new.load_state_dict(ref.state_dict())
    return new, ref


def _assert_same_step(new, ref, x):
    """Same outputs and gradients, bit for bit."""
    new.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = new(xa), ref(xb)
    assert torch.equal(out_a, out_b)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    for (name, pa), (_, pb) in zip(new.named_parameters(), ref.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), name


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kw", CONV_KW)
@pytest.mark.parametrize("cls", [ApproxConv2d, ApproxConv2dDist])
@pytest.mark.parametrize("full", [dict(sample_ratio=1.0), dict(sample_ratio=0.3, minimal_k=6)])
def test_conv_full_k_and_eval_match_nn_conv2d(kw, cls, full):
    new, ref = _twins(cls, nn.Conv2d, 6, 5, **kw, **full)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    _assert_same_step(new.train(), ref.train(), x)
    low, _ = _twins(cls, nn.Conv2d, 6, 5, **kw, sample_ratio=0.3)
    _assert_same_step(low.eval(), ref.eval(), x)  # eval mode is exact whatever the ratio


@pytest.mark.parametrize("cls", [ApproxLinear, ApproxLinearDist])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_k_and_eval_match_nn_linear(cls, bias):
    new, ref = _twins(cls, nn.Linear, 7, 4, bias=bias, sample_ratio=1.0)
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    _assert_same_step(new, ref, x)
    low, _ = _twins(cls, nn.Linear, 7, 4, bias=bias, sample_ratio=0.25)
    _assert_same_step(low.eval(), ref.eval(), x)


def test_training_forward_is_sampled_and_weight_grad_is_zero_outside():
    torch.manual_seed(1)
    layer = ApproxConv2d(8, 4, 3, padding=1, sample_ratio=0.5)
    x = torch.randn(2, 8, 6, 6)
    out = layer(x)
    assert not torch.allclose(out, layer.eval()(x))
    out.sum().backward()
    dead = layer.weight.grad.flatten(2).abs().sum((0, 2)) == 0
    assert int(dead.sum()) == 4


@pytest.mark.parametrize("cls, args", [(ApproxLinearDist, (10, 3)), (ApproxConv2dDist, (10, 3, 3))])
def test_dist_last_indices_follow_the_weight_norms(cls, args):
    torch.manual_seed(2)
    layer = cls(*args, sample_ratio=0.4)
    assert layer.last_indices is None
    x = torch.randn(2, 10) if cls is ApproxLinearDist else torch.randn(2, 10, 5, 5)
    layer(x).sum().backward()
    idx = layer.last_indices
    assert idx.dtype == torch.long and torch.equal(idx, idx.sort().values) and idx.numel() == 4
    norms = layer.weight.detach().transpose(0, 1).reshape(10, -1).norm(dim=1)
    assert set(idx.tolist()) == set(norms.argsort(descending=True)[:4].tolist())
    grad_cols = layer.weight.grad.transpose(0, 1).reshape(10, -1).abs().sum(1) != 0
    assert set(grad_cols.nonzero().squeeze(1).tolist()) <= set(idx.tolist())
    with torch.no_grad():  # the selection moves with the weights
        layer.weight[:, idx] *= 0.01
    layer(x)
    assert not set(layer.last_indices.tolist()) & set(idx.tolist())


@pytest.mark.parametrize("cls, args", [(ApproxLinearDist, (16, 3)), (ApproxConv2dDist, (16, 3, 1))])
def test_dist_bernoulli_weight_is_reproducible_from_the_seed(cls, args):
    """Two replicas seeded alike draw the same channels step after step (what lets every
    DDP rank agree without exchanging indices); another seed draws others."""
    x = torch.randn(2, 16) if cls is ApproxLinearDist else torch.randn(2, 16, 3, 3)
    a = cls(*args, sample_ratio=0.5, policy="bernoulli_weight", seed=7)
    b = copy.deepcopy(a)
    c = cls(*args, sample_ratio=0.5, policy="bernoulli_weight", seed=8)
    c.load_state_dict(a.state_dict())
    same_as_c = 0
    for _ in range(5):
        a(x), b(x), c(x)
        assert torch.equal(a.last_indices, b.last_indices)
        assert torch.equal(a.last_indices, a.last_indices.sort().values)
        same_as_c += torch.equal(a.last_indices, c.last_indices)
    assert same_as_c < 5


def test_dist_eval_uses_every_channel():
    layer = ApproxLinearDist(6, 2, sample_ratio=0.5)
    layer.eval()
    layer(torch.randn(3, 6))
    assert layer.last_indices is None


def test_attributes_change_between_steps_and_show_in_repr():
    layer = ApproxConv2d(12, 4, 3, sample_ratio=0.5)
    text = repr(layer)
    for part in ("sample_ratio=0.5", "minimal_k=1", "policy='topk'", "mode='forward'", "kernel_size=(3, 3)"):
        assert part in text
    x = torch.randn(1, 12, 5, 5)
    layer(x).sum().backward()
    assert int((layer.weight.grad.abs().sum((0, 2, 3)) != 0).sum()) == 6
    layer.weight.grad = None
    layer.sample_ratio, layer.policy, layer.minimal_k = 0.25, "uniform", 2
    layer(x).sum().backward()
    assert int((layer.weight.grad.abs().sum((0, 2, 3)) != 0).sum()) == 3
    assert "policy='uniform'" in repr(layer) and "seed" in repr(ApproxConv2dDist(2, 2, 1, seed=3))


def test_modules_are_torch_subclasses_with_torch_state_dicts():
    assert isinstance(ApproxLinear(3, 2), nn.Linear) and isinstance(ApproxConv2dDist(3, 2, 1), nn.Conv2d)
    assert set(ApproxConv2d(3, 2, 3).state_dict()) == set(nn.Conv2d(3, 2, 3).state_dict())


def test_seed_aliases_take_the_seed_positional_arguments():
    lin = approx_Linear(10, 4, False, 0.5, 3)
    assert isinstance(lin, ApproxLinear) and lin.bias is None
    assert (lin.sample_ratio, lin.minimal_k) == (0.5, 3)
    conv = approx_Conv2d(8, 4, 3, 2, 1, 1, 1, False, "zeros", 0.25, 2)
    assert isinstance(conv, ApproxConv2d) and conv.bias is None
    assert (conv.stride, conv.padding, conv.sample_ratio, conv.minimal_k) == ((2, 2), (1, 1), 0.25, 2)
    dist = approx_Conv2d_dist(8, 4, 3, 1, 1, 1, 1, True, "zeros", 0.5, 1)
    assert isinstance(dist, ApproxConv2dDist) and dist.policy == "topk_weight"
    out = dist(torch.randn(2, 8, 5, 5))
    assert out.shape == (2, 4, 5, 5) and dist.last_indices.numel() == 4
    assert conv(torch.randn(1, 8, 6, 6)).shape == (1, 4, 3, 3)
    assert lin(torch.randn(2, 10)).shape == (2, 4)
