"""A training forward that records no gradient leaves the selection stream alone.

Ranks agree on the channels because they draw the same stream of selections. A forward
that cannot produce a gradient (a logging pass under no_grad, or on frozen parameters and
an input without grad) run on one rank only must not move that rank's stream, for every
policy, or the ranks select different channels from then on."""
import pytest
import torch

from approxdist.nn import ApproxConv2dDist, ApproxLinearDist


def make(kind, policy):
    torch.manual_seed(0)
    if kind == "linear":
        return ApproxLinearDist(32, 8, sample_ratio=0.33, policy=policy, seed=4), torch.randn(3, 32)
    return ApproxConv2dDist(16, 8, 3, padding=1, sample_ratio=0.33, policy=policy, seed=4), torch.randn(2, 16, 5, 5)


def step(layer, x):
    layer(x).sum().backward()
    return layer.last_indices.clone()


def extra_forward(layer, x, how):
    if how == "no_grad":
        with torch.no_grad():
            layer(x)
    else:  # nothing requires grad: frozen weight and bias, plain input
        for p in layer.parameters():
            p.requires_grad_(False)
        layer(x)
        for p in layer.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("policy", ["bernoulli_weight", "topk_explore"])
@pytest.mark.parametrize("how", ["no_grad", "frozen"])
def test_a_forward_recording_no_gradient_leaves_the_stream(kind, policy, how):
    (a, x), (b, _) = make(kind, policy), make(kind, policy)
    for i in range(4):
        if i == 1:
            extra_forward(a, x, how)  # one "rank" logs
        assert torch.equal(step(a, x), step(b, x))
    sa, sb = a.sampler_state(), b.sampler_state()
    ga, gb = sa["generator"], sb["generator"]  # (topk_explore's rotation is drawn from the seed alone)
    assert (ga is None and gb is None and policy == "topk_explore") or torch.equal(ga, gb)
    assert (sa["rotation"] is None) == (sb["rotation"] is None)
    if sa["rotation"] is not None:
        assert torch.equal(sa["rotation"][0], sb["rotation"][0]) and sa["rotation"][1] == sb["rotation"][1]


def test_a_forward_recording_a_gradient_moves_the_stream():
    # The counterpart: without this the test above could pass with a frozen stream.
    a, x = make("linear", "bernoulli_weight")
    with torch.no_grad():
        a(x)
    fresh = torch.Generator().manual_seed(a.seed).get_state()
    assert a.sampler_state()["generator"] is None or torch.equal(a.sampler_state()["generator"], fresh)
    a(x)
    assert not torch.equal(a.sampler_state()["generator"], fresh)


def test_the_broadcast_agreement_skips_forwards_recording_no_gradient():
    layer, x = make("linear", "bernoulli_weight")
    calls = []
    layer._index_sync = lambda layer, idx, scale: (calls.append(1), (idx, scale))[1]
    with torch.no_grad():
        layer(x)  # the other ranks run no such forward: a collective here would hang them
    assert calls == []
    layer(x)
    assert calls == [1]
