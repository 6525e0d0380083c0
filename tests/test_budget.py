"""convert_model(budget=...): per-layer ratios whose payload is the budget."""
import pytest
import torch
import torchvision

import approxdist as ad
from approxdist.functional import num_samples
from approxdist.nn.budget import budget_ratios, payload_fraction
from distharness import run_ranks


def sent_fraction(model):
    """The analytic payload of the sparse hook, counted from the converted layers."""
    dense = sent = 0
    for p in model.parameters():
        dense += p.numel()
    sent = dense
    for layer in model.modules():
        if isinstance(layer, (ad.nn.WeightSampled, ad.nn.ApproxConv2d, ad.nn.ApproxLinear)):
            n = layer.weight.shape[1]
            k = num_samples(n, layer.sample_ratio, layer.minimal_k)
            sent -= (n - k) * (layer.weight.numel() // n)
    return sent / dense


@pytest.mark.parametrize("budget", [0.5, 0.33, 0.2])
@pytest.mark.parametrize("distributed", [False, True])
def test_payload_is_within_the_budget_and_close_to_it(budget, distributed):
    model = torchvision.models.resnet18(num_classes=10)
    ad.convert_model(model, budget=budget, distributed=distributed)
    got = sent_fraction(model)
    assert budget - 0.01 <= got <= budget


def test_big_layers_are_sampled_hardest():
    model = torchvision.models.resnet18(num_classes=10)
    ad.convert_model(model, budget=0.33, distributed=True)
    r = {name: m.sample_ratio for name, m in model.named_modules() if isinstance(m, ad.nn.WeightSampled)}
    assert r["layer1.0.conv1"] == 1.0  # 37k weights: exact
    assert r["layer4.1.conv2"] < 0.33 < r["layer3.1.conv2"] < r["layer2.1.conv2"]
    # each layer's ratio gives back the channel count it was chosen for
    for name, m in model.named_modules():
        if isinstance(m, ad.nn.WeightSampled) and m.sample_ratio < 1:
            n = m.weight.shape[1]
            assert num_samples(n, m.sample_ratio) == int(n * m.sample_ratio)


def test_budget_one_leaves_every_layer_exact():
    model = torchvision.models.resnet18(num_classes=10)
    ad.convert_model(model, budget=1.0, distributed=True)
    assert all(m.sample_ratio == 1.0 for m in model.modules() if isinstance(m, ad.nn.WeightSampled))


def test_ratios_against_a_brute_force_optimum():
    """Two layers: no integer split of the channels sends the budget with a smaller sum of
    1/r - 1 than the bisection's, within one channel's rounding."""
    layers = [(64 * 16 * 9, 16), (256 * 64 * 9, 64)]
    dense = sum(s for s, _ in layers) + 100
    ratios = budget_ratios(layers, dense, 0.4)
    assert payload_fraction(layers, dense, ratios) <= 0.4
    best = None
    for k1 in range(1, 17):
        for k2 in range(1, 65):
            sent = 100 + k1 * 64 * 9 + k2 * 256 * 9
            if sent <= 0.4 * dense:
                cost = 16 / k1 - 1 + 64 / k2 - 1
                best = cost if best is None else min(best, cost)
    got = sum(n / num_samples(n, r) - 1 for (_, n), r in zip(layers, ratios))
    assert got <= best * 1.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "either sample_ratio"),
    (dict(sample_ratio=0.5, budget=0.5), "either sample_ratio"),
    (dict(budget=0.0), "budget must be a number in"),
    (dict(budget=1.5), "budget must be a number in"),
    (dict(budget=0.001), "budget must be at least"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ad.convert_model(torchvision.models.resnet18(num_classes=10), distributed=True, **kwargs)


def _hook_fraction(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    ad.convert_model(model, budget=0.33, distributed=True)
    ddp = DDP(model)
    state = ad.distributed.register(ddp)
    ddp(torch.randn(2, 3, 32, 32)).sum().backward()
    return sent_fraction(model), state.stats["payload_bytes"] / state.stats["dense_bytes"]


def test_budget_payload_matches_the_hook_count():
    """The hook's own count over one step on 2 gloo ranks equals the analytic fraction."""
    for want, got in run_ranks(_hook_fraction, 2):
        assert got == pytest.approx(want, abs=1e-9)
        assert 0.32 <= got <= 0.33
