"""Exact steps in a sampled run: set_sampling and SamplingSchedule (approxdist/nn/schedule.py).

Invariants: a schedule's exact step computes every channel on every rank, and the sparse
hook then sends the whole gradient (equal, bit for bit on 2 ranks, to DDP's all-reduce,
with the payload counted as the dense bytes); only training forwards with autograd count;
the count survives copies, pickles and checkpoints (sampler_state)."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from approxdist.functional import num_samples
from approxdist.nn import SamplingSchedule, WeightSampled, sampler_state, schedule_of, set_sampling
from distharness import run_ranks
from models import analytic_bytes, batch_for, make_model


def bn_net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def sampled(model):
    return [m for m in model.modules() if isinstance(m, WeightSampled)]


def test_exact_at_follows_warmup_period_and_last_steps():
    model = ad.convert_model(bn_net(), 0.5, distributed=True)
    s = SamplingSchedule(model, warmup=3, exact_every=4, exact_last=2, total=12)
    got = [i for i in range(14) if s.exact_at(i)]
    assert got == [0, 1, 2, 3, 7, 10, 11, 12, 13]
    s = SamplingSchedule(model)  # replaces the first one
    assert not any(s.exact_at(i) for i in range(20))
    assert schedule_of(model) is s


@pytest.mark.parametrize("distributed", [False, True])
def test_a_plain_loop_runs_the_scheduled_ratio_at_each_step(distributed):
    """Only training forwards with autograd count: not the BatchNorm statistics pass,
    not a no_grad logging pass, not evaluation."""
    model = ad.convert_model(bn_net(), 0.5, distributed=distributed, mode="forward")
    sched = SamplingSchedule(model, warmup=2, exact_every=3, exact_last=1, total=9)
    layer = model[3]
    n = layer.weight.shape[1]
    calls = []
    layer.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 6, 6)
    for step in range(9):
        calls.clear()
        model.train()
        loss = model(x).square().mean()
        loss.backward()
        channels = int(layer.weight.grad.abs().sum(dim=(0, 2, 3)).gt(0).sum())
        opt.step()
        opt.zero_grad()
        exact = step < 2 or step % 3 == 2 or step == 8
        assert layer.sampling_enabled is not sched.exact_at(step + 1)  # set for the next one
        # exact: one forward of the whole batch; sampled: the statistics pass on a quarter, then the batch
        assert calls == ([8] if exact else [2, 8]), step
        if distributed:
            want = n if exact else num_samples(n, 0.5)
            assert layer.last_indices.numel() == want, step
            assert channels <= want
        with torch.no_grad():
            model(x)  # logging pass
        model.eval()
        model(x)
    assert sched.forwards == 9


def test_exact_step_is_the_plain_layer_and_the_switch_is_per_layer():
    torch.manual_seed(0)
    layer = ad.nn.ApproxConv2d(8, 4, 3, sample_ratio=0.25)
    plain = nn.Conv2d(8, 4, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 5, 5)
    model = nn.Sequential(layer)
    assert set_sampling(model, False) == 1
    assert set_sampling(model, False) == 0
    assert torch.equal(layer(x), plain(x))
    set_sampling(model, True)
    assert not torch.allclose(layer(x), plain(x))
    with pytest.raises(ValueError, match="enabled must be True or False"):
        set_sampling(model, 1)
    with pytest.raises(ValueError, match="sampling_enabled must be True or False"):
        layer.sampling_enabled = "no"


def test_arguments_are_validated():
    model = ad.convert_model(bn_net(), 0.5, distributed=True)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        SamplingSchedule(model, warmup=-1)
    with pytest.raises(ValueError, match="exact_every must be an integer >= 0"):
        SamplingSchedule(model, exact_every=2.5)
    with pytest.raises(ValueError, match="exact_last needs total"):
        SamplingSchedule(model, exact_last=3)
    with pytest.raises(ValueError, match="no sampled layer"):
        SamplingSchedule(bn_net(), warmup=3)


def _train(model, steps, x):
    for _ in range(steps):
        model(x).square().mean().backward()
    return [m.last_indices.clone() for m in sampled(model)]


def test_sampler_state_resumes_the_count_and_copies_carry_their_own():
    model = ad.convert_model(bn_net(), 0.5, distributed=True, policy="topk_explore")
    SamplingSchedule(model, warmup=3, exact_every=4)
    x = torch.randn(8, 3, 6, 6)
    _train(model, 2, x)
    state = copy.deepcopy(sampler_state(model))
    assert state["#schedule"] == {"forwards": 2}
    copied = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = ad.convert_model(bn_net(), 0.5, distributed=True, policy="topk_explore")
    SamplingSchedule(fresh, warmup=3, exact_every=4)
    fresh.load_state_dict(model.state_dict())
    ad.nn.load_sampler_state(fresh, state)
    for _ in range(6):
        want = _train(model, 1, x)
        for other in (copied, loaded, fresh):
            assert all(torch.equal(a, b) for a, b in zip(want, _train(other, 1, x)))
    assert schedule_of(copied).forwards == schedule_of(model).forwards == 8
    with pytest.raises(ValueError, match="no schedule count"):
        ad.nn.load_sampler_state(fresh, {k: v for k, v in state.items() if k != "#schedule"})
    plain = ad.convert_model(bn_net(), 0.5, distributed=True)
    with pytest.raises(ValueError, match="unexpected"):
        ad.nn.load_sampler_state(plain, state)


def test_remove_leaves_the_layers_sampled():
    model = ad.convert_model(bn_net(), 0.5, distributed=True)
    sched = SamplingSchedule(model, warmup=10)
    assert not model[3].sampling_enabled
    sched.remove()
    assert schedule_of(model) is None and model[3].sampling_enabled
    assert "#schedule" not in sampler_state(model)
    model(torch.randn(4, 3, 6, 6))
    assert model[3].last_indices.numel() == num_samples(16, 0.5)


def test_a_selection_prepared_before_a_switch_is_not_used():
    model = ad.convert_model(bn_net(), 0.5, distributed=True)
    x = torch.randn(4, 3, 6, 6)
    layer = model[3]
    layer.prepare_next()  # prepared sampled...
    set_sampling(model, False)  # ...then switched to exact
    model(x).sum().backward()
    assert layer.last_indices.numel() == 16


def test_the_schedule_sets_the_next_step_before_the_hook_prepares_it():
    model = ad.convert_model(bn_net(), 0.5, distributed=True, mode="forward")
    SamplingSchedule(model, warmup=1)
    x = torch.randn(4, 3, 6, 6)
    layer = model[3]
    model(x).sum().backward()  # step 0, exact
    assert layer.last_indices.numel() == 16
    layer.prepare_next()  # what the in-hook step does after the weight step: step 1 is sampled
    prepared = layer._prepared[1].clone()
    layer._select = None  # a fresh selection would fail: the prepared one must be used
    model(x).sum().backward()
    assert torch.equal(layer.last_indices, prepared) and prepared.numel() == num_samples(16, 0.5)


# -- the sparse hook across warm-up -> sampled and periodic exact steps, 2 gloo ranks ---
STEPS = 7


def schedule_worker(rank, world, policy, agreement, how):
    torch.manual_seed(0)
    base = make_model("cnn")
    ad.convert_model(base, 0.33, distributed=True, policy=policy, seed=3, allow_unbiased=True)
    models = [copy.deepcopy(base) for _ in range(2)]
    scheds = [SamplingSchedule(m, warmup=2, exact_every=3) for m in models]
    sparse, dense = DDP(models[0], bucket_cap_mb=0.01), DDP(models[1], bucket_cap_mb=0.01)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (sparse, dense)]
    state = ad.distributed.SparseAllReduceState(agreement=agreement, check_every=1)
    ad.distributed.register(sparse, state, optimizer=None if how == "hook" else opts[0],
                            overlap_forward=how == "forward_overlap")
    loss_fn = nn.CrossEntropyLoss()
    payload, exact_steps = [], []
    for step in range(STEPS):
        x, y = batch_for("cnn", rank, step)
        exact_steps.append(scheds[0].exact_at(step))
        before = state.payload_bytes
        for ddp, opt in zip((sparse, dense), opts):
            loss_fn(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        payload.append(state.payload_bytes - before)
    ad.distributed.finish_steps(sparse)
    return {"sparse": [p.detach().clone() for p in models[0].parameters()],
            "dense": [p.detach().clone() for p in models[1].parameters()],
            "payload": payload, "exact_steps": exact_steps,
            "dense_bytes": sum(p.numel() * p.element_size() for p in models[0].parameters()),
            "analytic": analytic_bytes(models[0])}


@pytest.mark.parametrize("policy, agreement, how", [
    ("topk_weight", "local", "hook"),
    ("topk_explore", "check", "hook"),
    ("bernoulli_weight", "broadcast", "hook"),
    ("topk_explore", "local", "optimizer"),
    ("topk_weight", "local", "forward_overlap"),
])
def test_sparse_hook_equals_dense_across_warmup_and_exact_steps(policy, agreement, how):
    results = run_ranks(schedule_worker, 2, policy, agreement, how)
    for r in results:
        for ps, pd in zip(r["sparse"], r["dense"]):
            assert torch.equal(ps, pd), (ps - pd).abs().max()
        assert r["exact_steps"] == [True, True, True, False, False, True, False]
        assert r["analytic"] < r["dense_bytes"]
        for step, (sent, exact) in enumerate(zip(r["payload"], r["exact_steps"])):
            if policy == "bernoulli_weight" and not exact:
                assert sent < r["dense_bytes"], step  # Bernoulli draws: k is k in expectation
            else:
                assert sent == (r["dense_bytes"] if exact else r["analytic"]), step
    for a, b in zip(results[0]["sparse"], results[1]["sparse"]):
        assert torch.equal(a, b), "ranks disagree"
