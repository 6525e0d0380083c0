"""The optimizer step inside the comm hook (distributed/overlap.py) and the sampled
layers' prepared next forward (WeightSampled.prepare_next).

Invariant: a model trained with the in-hook step equals, bit for bit, the same model
trained with the same hook and the usual `backward(); optimizer.step()` loop, on every
rank; the user's own `optimizer.step()` steps only what no bucket stepped."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from approxdist.nn import WeightSampled
from distharness import run_ranks
from models import batch_for, make_model, make_optimizer


def _run(ddp, opt, sched, name, rank, steps, accum, extra=None, zero="none", seen=None):
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        for micro in range(accum):
            x, y = batch_for(name, rank, step * accum + micro)
            # DDP decides in the forward whether the backward reduces: both go in no_sync.
            with ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                out = ddp(x)
                if extra is not None:
                    out = out * extra
                loss_fn(out, y).backward()
        if seen is not None:  # after backward, before the user's step
            seen.append({"grads": [p.grad.clone() for p in ddp.parameters()],
                         "prepared": sum(m._prepared is not None for m in ddp.modules()
                                         if isinstance(m, WeightSampled))})
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=(zero == "none"))


def overlap_worker(rank, world, name, hook, opt_name, ddp_kw, accum=1, zero="none", ratio=0.5,
                   agreement="local", policy="topk_weight"):
    base = make_model(name)
    if hook.startswith("sparse"):
        # forward mode: the in-hook step gathers the next forward's weights (prepare_next)
        ad.convert_model(base, ratio, distributed=True, policy=policy, mode="forward", allow_unbiased=True)
    twins, opts, scheds, extras = [], [], [], []
    for overlapped in (True, False):
        model = DDP(copy.deepcopy(base), **ddp_kw)
        # A parameter the optimizer holds but DDP does not reduce: only the user's
        # optimizer.step() can step it.
        extra = nn.Parameter(torch.ones(()))
        opt = make_optimizer(opt_name, [{"params": list(model.parameters())}, {"params": [extra], "lr": 0.01}])
        step_opt = opt if overlapped else None
        if hook == "sparse":
            state = ad.distributed.SparseAllReduceState(agreement=agreement, check_every=1)
            ad.distributed.register(model, state, optimizer=step_opt)
        elif hook == "sparse_in_fp16":  # torch's wrapper hands the hook an fp16 bucket
            h = default_hooks.fp16_compress_wrapper(ad.distributed.sparse_allreduce_hook)
            model.register_comm_hook(ad.distributed.SparseAllReduceState(),
                                     h if step_opt is None else ad.distributed.optimizer_wrapper(h, opt))
        else:
            h = getattr(default_hooks, f"{hook}_hook")
            model.register_comm_hook(None, h if step_opt is None else ad.distributed.optimizer_wrapper(h, opt))
        twins.append(model)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
        extras.append(extra)
    seen = [[], []]
    for i in range(2):
        _run(twins[i], opts[i], scheds[i], name, rank, 4, accum, extras[i], zero, seen[i])
    return {
        "params": [[p.detach().clone() for p in m.parameters()] + [e.detach().clone()]
                   for m, e in zip(twins, extras)],
        "grads": [[g for s in seen_i for g in s["grads"]] for seen_i in seen],
        "prepared": seen[0][-1]["prepared"],
        "sampled": sum(isinstance(m, WeightSampled) for m in twins[0].modules()),
        "extra_moved": float(extras[0].detach()) != 1.0,
        "state_sizes": [len(o.state) for o in opts],
    }


def _assert_same(results):
    for r in results:
        overlapped, usual = r["params"]
        for a, b in zip(overlapped, usual):
            assert torch.equal(a, b), (a - b).abs().max()
        for a, b in zip(*r["grads"]):
            assert torch.equal(a, b), "the reduced gradients differ"
        assert r["extra_moved"], "the user's step did not step the parameter DDP does not hold"
        assert r["state_sizes"][0] == r["state_sizes"][1]
    # The last entry is the parameter DDP does not hold: it may differ across ranks.
    for a, b in zip(results[0]["params"][0][:-1], results[-1]["params"][0][:-1]):
        assert torch.equal(a, b), "ranks disagree"


@pytest.mark.parametrize("opt_name", ["sgd", "adamw", "sgd_foreach"])
def test_in_hook_step_equals_the_usual_loop(opt_name):
    results = run_ranks(overlap_worker, 2, "cnn", "sparse", opt_name, {"bucket_cap_mb": 0.01})
    _assert_same(results)
    r = results[0]
    # Every sampled layer had its next selection prepared by the time backward returned.
    assert r["sampled"] >= 4 and r["prepared"] == r["sampled"]


def test_in_hook_step_with_topk_explore_prepares_the_same_rotation():
    """'topk_explore' selections prepared in the hook after the step move the rotation
    as the forward would have: the same channels, parameters and gradients."""
    results = run_ranks(overlap_worker, 2, "cnn", "sparse", "sgd", {"bucket_cap_mb": 0.01}, 1, "none",
                        0.33, "local", "topk_explore")
    _assert_same(results)
    assert results[0]["prepared"] == results[0]["sampled"]


@pytest.mark.parametrize("agreement", ["check", "broadcast"])
def test_in_hook_step_with_index_agreement(agreement):
    """'check' compares index digests in the hook body every step; 'broadcast' makes the
    selection a collective, so those layers prepare nothing and select in the forward."""
    results = run_ranks(overlap_worker, 2, "cnn", "sparse", "sgd", {"bucket_cap_mb": 0.01}, 1, "none",
                        0.5, agreement)
    _assert_same(results)
    assert results[0]["prepared"] == (results[0]["sampled"] if agreement == "check" else 0)


def test_in_hook_step_on_three_ranks():
    _assert_same(run_ranks(overlap_worker, 3, "cnn", "sparse", "sgd", {"bucket_cap_mb": 0.01}))


@pytest.mark.parametrize("ddp_kw,accum,zero", [
    ({}, 1, "zeros"),
    ({"gradient_as_bucket_view": True}, 1, "none"),
    ({"static_graph": True, "bucket_cap_mb": 0.01}, 1, "none"),
    ({"bucket_cap_mb": 0.01}, 3, "none"),
], ids=["one_bucket_zeros", "bucket_view", "static_graph", "no_sync_accumulation"])
def test_in_hook_step_with_ddp_options(ddp_kw, accum, zero):
    _assert_same(run_ranks(overlap_worker, 2, "cnn", "sparse", "sgd", ddp_kw, accum, zero))


def test_in_hook_step_with_resnet18_weights_in_dim1_major_layout():
    """resnet18's converted weights are dim-1-major; DDP's GradBucket.gradients() would
    hand them to the optimizer as row-major views of the wrong elements."""
    results = run_ranks(overlap_worker, 2, "resnet18", "sparse", "sgd", {"bucket_cap_mb": 5}, 1, "none", 0.33)
    _assert_same(results)


@pytest.mark.parametrize("hook", ["allreduce", "fp16_compress", "sparse_in_fp16"])
def test_wrapper_around_torch_hooks(hook):
    _assert_same(run_ranks(overlap_worker, 2, "mlp", hook, "sgd", {"bucket_cap_mb": 0.001}))


def find_unused_worker(rank, world):
    model = DDP(ad.convert_model(make_model("cnn"), 0.5, distributed=True), find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        ad.distributed.register(model, optimizer=opt)
    except ValueError as e:
        return str(e)
    return None


def test_refuses_find_unused_parameters():
    for msg in run_ranks(find_unused_worker, 2):
        assert msg is not None and "find_unused_parameters" in msg


def test_refuses_optimizers_it_cannot_split():
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="LBFGS"):
        ad.distributed.optimizer_wrapper(default_hooks.allreduce_hook, torch.optim.LBFGS(params))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ad.distributed.optimizer_wrapper(default_hooks.allreduce_hook, object())


# -- prepare_next (single process) -----------------------------------------------------
def _layers():
    return [
        ad.nn.ApproxConv2dDist(16, 8, 3, padding=1, sample_ratio=0.5),
        ad.nn.ApproxConv2dDist(16, 8, 1, stride=2, sample_ratio=0.25),  # a matrix product
        ad.nn.ApproxConv2dDist(16, 8, 3, padding="same", padding_mode="reflect", sample_ratio=0.4),
        ad.nn.ApproxConv2dDist(16, 8, 4, padding="same", sample_ratio=0.4),  # uneven 'same'
        ad.nn.ApproxLinearDist(16, 8, sample_ratio=0.3),
    ]


def _input(layer):
    g = torch.Generator().manual_seed(3)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, 16, 7, 7, generator=g)
    return torch.randn(3, 5, 16, generator=g)


def _no_select(layer):
    def fail():
        raise AssertionError("the forward selected anew instead of using the prepared selection")
    layer._select = fail


@pytest.mark.parametrize("index", range(5))
def test_prepared_forward_is_used_and_identical(index):
    torch.manual_seed(index)
    plain = _layers()[index]
    prepared = copy.deepcopy(plain)
    prepared.prepare_next()
    saved = prepared._select
    _no_select(prepared)
    x = _input(plain)
    out_p, out = prepared(x), plain(x)
    assert torch.equal(out_p, out)
    out_p.square().sum().backward()
    out.square().sum().backward()
    assert torch.equal(prepared.weight.grad, plain.weight.grad)
    assert torch.equal(prepared.last_indices, plain.last_indices)
    prepared._select = saved
    assert prepared._prepared is None, "a prepared selection is used once"


def _counting(layer):
    calls = [0]
    select = layer._select

    def counted():
        calls[0] += 1
        return select()
    layer._select = counted
    return calls


def test_prepared_selection_is_dropped_when_the_weight_or_settings_change():
    layer = ad.nn.ApproxConv2dDist(16, 8, 3, padding=1, sample_ratio=0.5)
    calls = _counting(layer)
    x = _input(layer)
    layer.prepare_next()
    with torch.no_grad():
        layer.weight.mul_(-1.0).add_(torch.linspace(0, 1, 8).view(8, 1, 1, 1))  # in place: new version
    reference = copy.deepcopy(layer)
    del reference._select  # the copied counter: back to the class's method
    assert torch.equal(layer(x), reference(x))
    assert calls[0] == 2  # prepare_next, then the forward again
    layer.prepare_next()
    layer.sample_ratio = 0.25
    layer(x)
    assert calls[0] == 4 and layer.last_indices.numel() == 4
    layer.prepare_next()
    layer.discard_prepared()
    layer(x)
    assert calls[0] == 6


def test_copies_and_old_pickles_start_without_a_prepared_selection():
    layer = ad.nn.ApproxLinearDist(16, 8, sample_ratio=0.5)
    layer.prepare_next()
    assert copy.deepcopy(layer)._prepared is None
    state = layer.__getstate__()
    del state["_prepared"]  # as pickled before prepare_next existed
    old = ad.nn.ApproxLinearDist.__new__(ad.nn.ApproxLinearDist)
    old.__setstate__(state)
    assert old(_input(old)).shape == (3, 5, 8)


def test_prepare_next_is_a_no_op_where_it_cannot_be_exact():
    torch.manual_seed(0)
    bern = ad.nn.ApproxConv2dDist(16, 8, 3, sample_ratio=0.5, policy="bernoulli_weight")
    blackbox = ad.nn.ApproxConv2dDist(16, 8, 3, sample_ratio=0.5, mode="blackbox")
    evaluating = ad.nn.ApproxLinearDist(16, 8, sample_ratio=0.5).eval()
    synced = ad.nn.ApproxLinearDist(16, 8, sample_ratio=0.5)
    synced._index_sync = lambda layer, idx, scale: (idx, scale)  # as 'broadcast' installs it
    for layer in (bern, blackbox, evaluating, synced):
        layer.prepare_next()
        assert layer._prepared is None, type(layer)


def test_prepared_weight_under_autocast_falls_back_to_a_fresh_gather():
    torch.manual_seed(1)
    plain = ad.nn.ApproxConv2dDist(16, 8, 3, padding=1, sample_ratio=0.5)
    prepared = copy.deepcopy(plain)
    prepared.prepare_next()
    x = _input(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, out = prepared(x), plain(x)
    assert out_p.dtype == torch.bfloat16
    assert torch.equal(out_p, out)


def test_prepared_weight_only_in_forward_mode():
    w = torch.randn(8, 16)
    idx = torch.tensor([1, 4, 9])
    ws = ad.functional.sampled_linear_weight(w, idx)
    with pytest.raises(ValueError, match="prepared_weight"):
        ad.functional.sampled_linear(torch.randn(2, 16), w, None, idx, mode="blackbox", prepared_weight=ws)


def accumulate_without_no_sync_worker(rank, world):
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.register_comm_hook(None, ad.distributed.optimizer_wrapper(default_hooks.allreduce_hook, opt))
    loss_fn = nn.CrossEntropyLoss()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch_for("mlp", rank, 0)
    loss_fn(model(x), y).backward()
    once = [p.detach().clone() for p in model.parameters()]
    try:
        loss_fn(model(x), y).backward()  # accumulating, but DDP reduces (and the hook steps)
    except RuntimeError as e:
        message = str(e)
    else:
        message = None
    after = [p.detach().clone() for p in model.parameters()]
    stepped_once = all(not torch.equal(a, b) for a, b in zip(before, once))
    return message, stepped_once, all(torch.equal(a, b) for a, b in zip(once, after))


def test_a_second_reduction_before_the_step_raises_instead_of_stepping_twice():
    for message, stepped_once, unchanged in run_ranks(accumulate_without_no_sync_worker, 2):
        assert message is not None and "no_sync" in message
        assert stepped_once and unchanged


def test_prepared_weight_of_a_one_pixel_layer_is_its_tap():
    """After a training forward on a one-pixel image, prepare_next gathers only the tap
    that reads it (dim-1-major, as the forward would; not a row-major copy of the whole
    blocks), and the prepared forward equals a plain one."""
    from approxdist.functional._layout import dim1_major

    torch.manual_seed(0)
    plain = ad.nn.ApproxConv2dDist(16, 32, 3, padding=1, sample_ratio=0.5)
    prepared = copy.deepcopy(plain)
    x = torch.randn(4, 16, 1, 1, generator=torch.Generator().manual_seed(2))
    prepared(x)
    prepared.prepare_next()
    assert dim1_major(prepared._prepared[3]) and prepared._prepared[3].shape == (32, 8, 1, 1)
    _no_select(prepared)
    out_p, out = prepared(x), plain(x)
    assert torch.equal(out_p, out)
    out_p.square().sum().backward()
    out.square().sum().backward()
    assert torch.equal(prepared.weight.grad, plain.weight.grad)
