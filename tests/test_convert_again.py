"""convert_model leaves nothing half-converted: a second call applies its arguments or
raises before changing anything, the same call twice changes nothing, and a module type
it cannot sample stays exact with one debug line naming it."""
import logging

import pytest
import torch
import torch.nn as nn

import approxdist as ad
from approxdist.nn import ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist, norm_stats_of

APPROX = (ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 10))


def _snapshot(model):
    layers = {name: (type(m), m.sample_ratio, m.minimal_k, m.policy, m.mode, getattr(m, "seed", None),
                     m.weight.stride())
              for name, m in model.named_modules() if isinstance(m, APPROX)}
    return layers, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("distributed", [False, True])
def test_same_call_twice_changes_nothing(distributed):
    model = ad.convert_model(_net(), 0.5, distributed=distributed, policy="bernoulli_weight" if distributed else None,
                     allow_unbiased=True)
    model.train()(torch.randn(4, 3, 4, 4)).sum().backward()  # the generators have moved
    before = _snapshot(model)
    sampler = ad.nn.sampler_state(model)
    hooks = norm_stats_of(model)
    ad.convert_model(model, 0.5, distributed=distributed, policy="bernoulli_weight" if distributed else None,
                     allow_unbiased=True)
    after = _snapshot(model)
    assert after[0] == before[0]
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert norm_stats_of(model) is hooks
    if distributed:
        again = ad.nn.sampler_state(model)
        assert all(torch.equal(again[n]["generator"], sampler[n]["generator"]) for n in sampler)


def test_second_call_applies_other_arguments():
    model = ad.convert_model(_net(), 0.5, distributed=True)
    ad.convert_model(model, 0.25, minimal_k=2, distributed=True, policy="bernoulli_weight", allow_unbiased=True, seed=5,
                     weight_layout="contiguous", explore=0.5)
    conv, fc = model[3], model[5]
    assert (conv.sample_ratio, conv.minimal_k, conv.policy, conv.seed, conv.explore) == (0.25, 2, "bernoulli_weight", 5, 0.5)
    assert fc.seed == 6 and conv.weight.is_contiguous() and fc.weight.is_contiguous()
    model.train()(torch.randn(4, 3, 4, 4)).sum().backward()
    assert fc.last_indices.numel() <= 128  # it samples with the new settings
    ad.convert_model(model, budget=0.6, distributed=True)
    assert fc.sample_ratio < 1 and conv.policy == "topk_explore"  # the distributed default again


@pytest.mark.parametrize("second", [dict(distributed=False), dict(distributed=True, exclude=["5"]),
                                    dict(distributed=True, skip_first_conv=False, exclude=[nn.Linear])])
def test_conflicting_second_call_raises_before_changing_anything(second):
    model = ad.convert_model(_net(), 0.5, distributed=True, skip_first_conv=False)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="convert_model: '(0|5|3)'"):
        ad.convert_model(model, 0.25, **second)
    after = _snapshot(model)
    assert after[0] == before[0]


def test_types_it_cannot_sample_stay_exact_with_one_debug_line(caplog):
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3), MyLinear(8, 8), nn.Linear(8, 4),
                          nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with caplog.at_level(logging.DEBUG, logger="approxdist.nn.convert"):
        ad.convert_model(model, 0.5)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Embedding, nn.Conv1d, MyLinear, ApproxLinear, nn.MultiheadAttention]
    lines = [r.getMessage() for r in caplog.records]
    for name, kind in [("0", "Embedding"), ("1", "Conv1d"), ("2", "MyLinear"), ("4", "MultiheadAttention")]:
        mine = [line for line in lines if line.startswith(f"convert_model: {name} ({kind})")]
        assert len(mine) == 1, (name, lines)
    assert not any(line.startswith("convert_model: 4.out_proj") for line in lines)


def test_hooks_with_kwargs_are_carried_over():
    seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].register_forward_pre_hook(lambda m, args, kwargs: seen.append(type(m)), with_kwargs=True)
    ad.convert_model(model, 0.5, skip_first_conv=False)
    model(torch.randn(3, 4))
    assert seen == [ApproxLinear] and type(model[0]) is ApproxLinear


def test_conv_kinds_unchanged_by_second_call():
    model = ad.convert_model(_net(), 0.5)
    ad.convert_model(model, 0.5)
    assert [type(m) for m in model][:4] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, ApproxConv2d]
    assert not isinstance(model[5], ApproxLinearDist)
