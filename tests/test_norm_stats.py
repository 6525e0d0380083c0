"""Running statistics of BatchNorm layers fit the exact forward that eval() runs
(approxdist/nn/norm_stats.py)."""
import copy
import pickle

import pytest
import torch
from torch import nn

import approxdist as ad
from approxdist.nn import norm_stats_of


def bn_net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("distributed", [False, True])
def test_running_stats_come_from_an_exact_forward_of_the_first_quarter(distributed):
    plain = bn_net()
    model = ad.convert_model(copy.deepcopy(plain), 0.5, distributed=distributed, mode="forward")
    x = torch.randn(16, 3, 8, 8)
    model.train()
    model(x).sum().backward()
    with torch.no_grad():
        plain.train()
        plain(x[:4])  # what the exact forward on a quarter of the batch gathers
    got, want = bn_buffers(model), bn_buffers(plain)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(got["1.num_batches_tracked"]) == 1  # one update per training forward


def test_sampled_statistics_are_what_plain_layers_gather():
    plain = bn_net()
    model = ad.convert_model(copy.deepcopy(plain), 0.5, distributed=True, mode="forward", norm_stats="sampled")
    assert norm_stats_of(model) is None
    x = torch.randn(16, 3, 8, 8)
    model(x)
    with torch.no_grad():
        plain(x)
    # the sampled forward's statistics differ from the exact ones
    assert not torch.allclose(bn_buffers(model)["4.running_var"], bn_buffers(plain)["4.running_var"])


def test_training_batch_statistics_and_gradients_are_unchanged():
    """The training forward still normalises with its own batch statistics: its output
    and gradients equal those of the same model without the hook."""
    base = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward", norm_stats="sampled")
    hooked = ad.convert_model(copy.deepcopy(base), 0.5, distributed=True, mode="forward")
    assert norm_stats_of(hooked) is not None
    x = torch.randn(16, 3, 8, 8)
    out_a, out_b = base(x), hooked(x)
    assert torch.equal(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (n, p), q in zip(base.named_parameters(), hooked.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_no_stats_pass_without_autograd_or_in_eval():
    model = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward")
    before = bn_buffers(model)
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8))  # a training-mode forward without autograd: one update
    after = bn_buffers(model)
    assert int(after["1.num_batches_tracked"]) == 1
    model.eval()
    model(torch.randn(8, 3, 8, 8))
    assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in after.items())
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])


def test_selection_stream_is_untouched():
    """The extra exact forward draws nothing: bernoulli_weight picks the same channels
    with and without it."""
    a = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward", policy="bernoulli_weight", allow_unbiased=True, norm_stats="sampled")
    b = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward", policy="bernoulli_weight", allow_unbiased=True)
    x = torch.randn(8, 3, 8, 8)
    for _ in range(3):
        a(x).sum().backward()
        b(x).sum().backward()
        for la, lb in zip(a.modules(), b.modules()):
            if isinstance(la, ad.nn.WeightSampled):
                assert torch.equal(la.last_indices, lb.last_indices)


def test_copies_and_pickles_carry_their_own_hook():
    model = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward", norm_stats_fraction=0.5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        hooks = norm_stats_of(clone)
        assert hooks is not None and hooks is not norm_stats_of(model) and hooks.fraction == 0.5
        before = bn_buffers(model)
        clone(torch.randn(8, 3, 8, 8)).sum().backward()
        assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in before.items())
        assert int(bn_buffers(clone)["1.num_batches_tracked"]) == 1


def test_a_failed_forward_leaves_the_norms_tracking():
    model = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward")
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 5, 8, 8))  # wrong channel count
    # the next forward (here in eval) sees tracking norms again
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm_stats="batch"), "norm_stats must be one of"),
    (dict(norm_stats_fraction=0), "norm_stats_fraction must be a number in"),
    (dict(norm_stats_fraction=1.5), "norm_stats_fraction must be a number in"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ad.convert_model(bn_net(), 0.5, **kwargs)


def test_models_without_batchnorm_get_no_hook():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    ad.convert_model(model, 0.5, skip_first_conv=False)
    assert norm_stats_of(model) is None


def test_every_nth_forward_updates_the_statistics():
    """norm_stats_every=2: the exact pass runs on the 1st, 3rd, ... training forward; the
    others leave the running statistics alone."""
    plain = bn_net()
    model = ad.convert_model(copy.deepcopy(plain), 0.5, distributed=True, mode="forward", norm_stats_every=2)
    xs = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    for x in xs:
        model(x).sum().backward()
    with torch.no_grad():
        for x in (xs[0], xs[2]):
            plain(x[:2])
    got, want = bn_buffers(model), bn_buffers(plain)
    assert int(got["1.num_batches_tracked"]) == 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    clone = copy.deepcopy(model)  # the count travels with a copy
    assert norm_stats_of(clone)._forwards == 3 and norm_stats_of(clone).every == 2


def test_bad_every():
    with pytest.raises(ValueError, match="norm_stats_every must be an integer >= 1"):
        ad.convert_model(bn_net(), 0.5, norm_stats_every=0)
