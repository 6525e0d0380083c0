"""The distributed layers' 'topk_explore' selection: the top channels by weight norm plus
a rotation over all of them (approxdist/nn/_dist.py)."""
import copy
import math

import pytest
import torch

import approxdist as ad
from approxdist.functional import channel_norms, num_samples
from approxdist.nn import ApproxConv2dDist, ApproxLinearDist


def conv(n=64, ratio=0.33, seed=3, **kw):
    torch.manual_seed(0)
    kw.setdefault("policy", "topk_explore")
    return ApproxConv2dDist(n, 16, 3, padding=1, sample_ratio=ratio, seed=seed, **kw)


def step(layer, x):
    layer(x).sum().backward()
    return layer.last_indices.clone()


def test_is_an_option_of_the_layers_and_convert_model():
    assert ApproxLinearDist(8, 4).policy == "topk_weight"  # the default (docs/benchmarks.md, Fidelity)
    assert ApproxLinearDist(8, 4, policy="topk_explore", explore=0.5).explore == 0.5
    model = ad.convert_model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), 0.5,
                             distributed=True, policy="topk_explore", explore=0.1)
    layers = [m for m in model.modules() if isinstance(m, ad.nn.WeightSampled)]
    assert {(m.policy, m.explore) for m in layers} == {("topk_explore", 0.1)}


@pytest.mark.parametrize("n, ratio, explore", [(64, 0.33, 0.25), (256, 0.33, 0.25), (100, 0.5, 0.1),
                                               (37, 0.2, 1.0)])
def test_every_channel_within_one_pass_of_the_rotation(n, ratio, explore):
    layer = conv(n, ratio, explore=explore)
    k = num_samples(n, ratio)
    r = max(1, round(explore * k))
    x = torch.randn(2, n, 4, 4)
    seen = torch.zeros(n, dtype=torch.bool)
    for _ in range(math.ceil(n / r)):
        idx = step(layer, x)
        assert idx.numel() == k and torch.equal(idx, idx.unique())  # sorted, unique, k
        seen[idx] = True
    assert bool(seen.all())


def test_the_top_part_is_the_top_by_weight_norm():
    layer = conv(64, 0.5, explore=0.25)  # k 32: 24 by norm, 8 from the rotation
    x = torch.randn(2, 64, 4, 4)
    norms = channel_norms(layer.weight.detach(), 1)
    idx = step(layer, x)
    top = set(norms.topk(24).indices.tolist())
    assert top <= set(idx.tolist())


def test_the_rotation_part_is_the_next_channels_of_the_permutation_not_in_the_top():
    """Against a plain Python walk of the saved permutation, over two passes, the weights
    moving between steps: the top k - r by norm, then the permutation walked cyclically
    from the saved position, skipping channels already chosen, until k are chosen."""
    layer = conv(64, 0.5, explore=0.25)  # k 32: 24 by norm, 8 from the rotation
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 64, 4, 4)
    perm, pos = layer.sampler_state()["rotation"]
    perm = perm.tolist()
    assert sorted(perm) == list(range(64)) and pos == 0
    for _ in range(2 * 64 // 8):
        want = set(channel_norms(layer.weight.detach(), 1).topk(24).indices.tolist())
        while len(want) < 32:
            want.add(perm[pos])
            pos = (pos + 1) % 64
        assert step(layer, x).tolist() == sorted(want)
        assert layer.sampler_state()["rotation"][1] == pos
        opt.step()
        opt.zero_grad()


def test_explore_zero_is_topk_weight():
    a, b = conv(explore=0.0), conv(policy="topk_weight")
    x = torch.randn(2, 64, 4, 4)
    for _ in range(3):
        assert torch.equal(step(a, x), step(b, x))


def test_replicas_agree_and_seeds_differ():
    a, b, c = conv(seed=5), conv(seed=5), conv(seed=6)
    x = torch.randn(2, 64, 4, 4)
    same = [torch.equal(step(a, x), step(b, x)) for _ in range(5)]
    other = [torch.equal(step(a, x), step(c, x)) for _ in range(5)]
    assert all(same) and not all(other)


def test_a_forward_without_autograd_does_not_move_the_rotation():
    a, b = conv(), conv()
    x = torch.randn(2, 64, 4, 4)
    for i in range(4):
        if i == 2:
            with torch.no_grad():
                a(x)  # a logging pass on one "rank"
        assert torch.equal(step(a, x), step(b, x))


def test_global_rng_untouched():
    layer = conv()
    x = torch.randn(2, 64, 4, 4)
    before = torch.get_rng_state()
    for _ in range(10):  # more than one pass of the rotation
        step(layer, x)
    assert torch.equal(before, torch.get_rng_state())


def test_sampler_state_resumes_the_rotation():
    a = conv()
    x = torch.randn(2, 64, 4, 4)
    for _ in range(3):
        step(a, x)
    b = copy.deepcopy(a)
    b._rotation = None
    b._generator = None
    ad.nn.load_sampler_state(torch.nn.Sequential(b), {"0": a.sampler_state()})
    for _ in range(6):
        assert torch.equal(step(a, x), step(b, x))


def test_explore_is_validated():
    with pytest.raises(ValueError, match="explore must be a number in"):
        conv(explore=1.5)
    with pytest.raises(ValueError, match="explore must be a number in"):
        ad.convert_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5, distributed=True, explore=-0.1)


@pytest.mark.parametrize("ratio", [0.5, 0.33])
def test_the_default_selects_every_channel_within_an_epoch(ratio):
    """convert_model(distributed=True)'s default selection moves: over one epoch of the
    digits (45 steps of 32) every input channel of every sampled layer is selected at
    least once, so every weight trains. (topk_weight kept 42 of 128 over a whole run.)"""
    import torch.nn.functional as F

    from approxdist.bench.fidelity import build, task_data

    (x, y), _ = task_data("cnn128")
    model = ad.convert_model(build("cnn128", 0), ratio, distributed=True)
    layers = [m for m in model.modules() if isinstance(m, ad.nn.WeightSampled) and m.samples_weight()]
    assert layers and {m.policy for m in layers} == {"topk_explore"}
    seen = [torch.zeros(m.weight.shape[1], dtype=torch.bool) for m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(y) - 31, 32):
        idx = order[i:i + 32]
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        for s, m in zip(seen, layers):
            s[m.last_indices] = True
    assert [int(s.sum()) for s in seen] == [s.numel() for s in seen]
