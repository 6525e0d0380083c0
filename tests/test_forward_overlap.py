"""The next forward overlapping the transfer (distributed/forward_overlap.py).

Invariants: the parameters and optimizer state equal, bit for bit, those of the usual
`backward(); optimizer.step()` loop with the same hook, on every rank; backward and the
user's step leave DDP's parameters untouched (their step comes with the next forward);
every rank launches the collectives in the planned order (deep buckets first, then the
held ones first-layers first)."""
import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from approxdist.distributed.forward_overlap import MIN_PIECE, payload_of
from distharness import run_ranks
from models import batch_for, make_model, make_optimizer


def _logged(hook, order, sizes, splits):
    """hook, logging each bucket's index and size when it is handed over for its
    reduction; also through its payload form (a bucket forward_overlap splits: `splits`)."""
    def log(bucket):
        order.append(bucket.index())
        sizes.append(bucket.buffer().numel())

    def logged(state, bucket):
        log(bucket)
        return hook(state, bucket)

    payload = payload_of(hook)
    if payload is not None:
        def logged_payload(state, bucket):
            splits.append(bucket.index())
            log(bucket)
            return payload(state, bucket)
        logged.payload = logged_payload
    return logged


def _counted(fn, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counted


def worker(rank, world, name, hook, opt_name, ddp_kw, ratio=0.5, steps=5, finish="state_dict",
           eager_fraction=1 / 3, accum=1):
    base = make_model(name)
    sparse = hook.startswith("sparse")
    compress = hook.partition("-")[2] or None  # "sparse-fp16": register(compress="fp16")
    if sparse:
        ad.convert_model(base, ratio, distributed=True)
    out = {}
    for overlapped in (True, False):
        model = DDP(copy.deepcopy(base), **ddp_kw)
        extra = nn.Parameter(torch.ones(()))  # only the user's step() can step it
        opt = make_optimizer(opt_name, [{"params": list(model.parameters())}, {"params": [extra], "lr": 0.01}])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        order, sizes, splits, prepared = [], [], [], []
        if sparse:
            state = ad.distributed.SparseAllReduceState(agreement="check", check_every=1)
            if overlapped:
                ad.distributed.register(model, state, optimizer=opt, overlap_forward=True,
                                        eager_fraction=eager_fraction, compress=compress)
                h = model._approxdist_forward_overlap.hook
                logged = _logged(h, order, sizes, splits)
                model._approxdist_forward_overlap.hook = logged
                model._approxdist_forward_overlap.payload = logged.payload
                for m in model.modules():  # count the layers prepared ahead of their forward
                    if isinstance(m, ad.nn.WeightSampled):
                        m.prepare_next = _counted(m.prepare_next, prepared)
            else:
                ad.distributed.register(model, state, compress=compress)
        else:
            h = _logged(getattr(default_hooks, f"{hook}_hook"), order, sizes, splits)
            state = dist.new_group() if overlapped else None
            if overlapped:
                h = ad.distributed.forward_overlap(model, h, opt, eager_fraction=eager_fraction)
            model.register_comm_hook(state, h)
        grads_zero, untouched, orders, layouts, split_log = [], [], [], [], []
        loss_fn = nn.CrossEntropyLoss()
        for step in range(steps):
            order.clear()
            sizes.clear()
            splits.clear()
            for micro in range(accum):  # DDP reduces only the last micro-batch's backward
                x, y = batch_for(name, rank, step * accum + micro)
                with model.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                    loss_fn(model(x) * extra, y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            grads_zero.append(all(p.grad is None or not p.grad.any() for p in model.parameters()))
            opt.step()
            sched.step()
            untouched.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
            opt.zero_grad(set_to_none=True)
            orders.append(list(order))
            split_log.append(list(splits))
            layouts.append([s for _, s in sorted(zip(order, sizes))])
        if finish == "state_dict":
            # (with buffers: BatchNorm's running statistics are each rank's own)
            saved = model.module.state_dict()
            params = [saved[n].clone() for n, _ in model.module.named_parameters()]
        elif finish == "optimizer":
            opt.state_dict()
            params = [p.detach().clone() for p in model.module.parameters()]
        else:
            ad.distributed.finish_steps(model)
            params = [p.detach().clone() for p in model.module.parameters()]
        moments = [opt.state[p][k].clone() for g in opt.param_groups for p in g["params"]
                   for k in sorted(opt.state[p]) if torch.is_tensor(opt.state[p][k])]
        out["overlap" if overlapped else "usual"] = {
            "params": params, "extra": extra.detach().clone(), "moments": moments,
            "grads_zero": grads_zero, "untouched": untouched, "orders": orders,
            "splits": split_log, "prepared": len(prepared), "buckets": len(orders[-1]),
            "layouts": layouts}
    return out


def _check(results, exact=True):
    """exact=False: the usual loop's values up to float rounding (a bucket split in two
    collectives on 3+ ranks); the ranks still agree bit for bit."""
    same = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-7))
    for r in results:
        a, b = r["overlap"], r["usual"]
        assert len(a["params"]) == len(b["params"])
        for x, y in zip(a["params"], b["params"]):
            assert same(x, y), (x - y).abs().max()
        assert same(a["extra"], b["extra"]) and not torch.equal(a["extra"], torch.ones(()))
        assert len(a["moments"]) == len(b["moments"])
        for x, y in zip(a["moments"], b["moments"]):
            assert same(x, y)
        # backward returns with zeros in .grad; neither it nor the user's step moves
        # DDP's parameters (their step comes with the next forward)
        assert all(a["grads_zero"]) and all(a["untouched"])
        assert not any(b["grads_zero"]) and not any(b["untouched"])
    for x, y in zip(results[0]["overlap"]["params"], results[-1]["overlap"]["params"]):
        assert torch.equal(x, y), "ranks disagree"
    assert all(r["overlap"]["orders"] == results[0]["overlap"]["orders"] for r in results)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_overlapped_training_equals_the_usual_loop(opt_name):
    results = run_ranks(worker, 2, "cnn", "sparse", opt_name, {"bucket_cap_mb": 0.003})
    _check(results)
    overlap = results[0]["overlap"]
    orders, layouts, splits = overlap["orders"], overlap["layouts"], overlap["splits"]
    assert orders[0] == list(range(len(orders[0])))  # the first step: synchronous, DDP's order
    assert splits[0] == []
    for i in range(1, len(orders)):
        n, total = len(layouts[i]), sum(layouts[i - 1])
        # eager while the buckets before hold less than a third of the elements
        m = next(j for j in range(1, n + 1) if j == n or sum(layouts[i][:j]) >= total / 3)
        assert orders[i] == list(range(m)) + list(range(n - 1, m - 1, -1)), orders[i]
        # the bucket crossing the third goes in two collectives, unless a piece would be
        # under MIN_PIECE of it
        share = (total / 3 - sum(layouts[i][:m - 1])) / layouts[i][m - 1]
        assert splits[i] == ([m - 1] if MIN_PIECE <= share < 1 - MIN_PIECE else []), (splits[i], share)
    assert len(layouts[-1]) >= 4 and 1 <= m < n - 1  # the test reorders something
    assert any(splits), "the test splits no bucket"
    # buckets reduced ahead of their layers' forward had those layers prepare it
    assert overlap["prepared"] > 0


def test_overlap_splits_a_compressed_sparse_bucket_and_equals_the_usual_loop():
    # register(compress="fp16") keeps the payload form: a bucket still splits in two
    results = run_ranks(worker, 2, "cnn", "sparse-fp16", "sgd", {"bucket_cap_mb": 0.003}, 0.5, 4,
                        "explicit")
    _check(results)
    assert any(results[0]["overlap"]["splits"]), "the test splits no bucket"


@pytest.mark.parametrize("finish,hook", [("optimizer", "allreduce"), ("explicit", "fp16_compress")])
def test_finish_steps_and_optimizer_state_dict_apply_the_pending_steps(finish, hook):
    # (torch's hooks, with a bucket split in two collectives through their payload form)
    results = run_ranks(worker, 2, "mlp", hook, "sgd", {"bucket_cap_mb": 0.001}, 0.5, 4, finish)
    _check(results)
    assert all(split == [1] for split in results[0]["overlap"]["splits"][1:])


def test_overlap_on_three_ranks_with_torch_fp16_hook_and_all_buckets_eager():
    results = run_ranks(worker, 3, "mlp", "fp16_compress", "sgd", {"bucket_cap_mb": 0.001}, 0.5, 4,
                        "state_dict", 1.0)
    _check(results)
    orders = results[0]["overlap"]["orders"]
    assert len(orders[-1]) >= 3 and all(order == list(range(len(order))) for order in orders)


def test_split_bucket_on_three_ranks_rounds_like_the_usual_loop():
    # On 3 ranks a collective's summation order depends on the tensor's length: a bucket
    # split in two collectives may differ from the usual loop in the last bit.
    results = run_ranks(worker, 3, "mlp", "allreduce", "sgd", {"bucket_cap_mb": 0.001}, 0.5, 4,
                        "state_dict", 0.4)
    _check(results, exact=False)
    assert all(split == [1] for split in results[0]["overlap"]["splits"][1:])


@pytest.mark.parametrize("ddp_kw,accum", [({"static_graph": True, "bucket_cap_mb": 0.003}, 1),
                                          ({"bucket_cap_mb": 0.003}, 3)],
                         ids=["static_graph", "no_sync_accumulation"])
def test_overlap_with_ddp_options(ddp_kw, accum):
    _check(run_ranks(worker, 2, "cnn", "sparse", "sgd", ddp_kw, 0.5, 4, "explicit", 1 / 3, accum))


def test_overlap_with_resnet18_dim1_major_weights():
    results = run_ranks(worker, 2, "resnet18", "sparse", "sgd", {"bucket_cap_mb": 5}, 0.33, 3)
    _check(results)
    assert all(split == [1] for split in results[0]["overlap"]["splits"][1:])


def last_launch_worker(rank, world, steps=5):
    """Logs every collective the overlap launches (dist.all_reduce wrapped): the phase
    that launched it and, at that moment, which of the collectives launched before it
    were complete (their futures' state, not a callback, which waits for the GIL); and
    whether the last held one was still waiting when backward returned."""
    torch.manual_seed(0)
    # one bucket per layer (a layer whose parameters straddle two buckets needs both at
    # once, and then the last one goes at once)
    layers = [nn.Linear(64, 64, bias=False) for _ in range(6)]
    model = DDP(nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())], nn.Linear(64, 5, bias=False)),
                bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = ad.distributed.forward_overlap(model, default_hooks.allreduce_hook, opt, eager_fraction=0.1)
    model.register_comm_hook(dist.new_group(), hook)
    overlap = model._approxdist_forward_overlap
    log, works, waiting, phase = [], [], [], [None]
    all_reduce = dist.all_reduce

    def logged(tensor, *args, **kwargs):
        log.append((phase[0], [w.get_future().done() for w in works]))
        work = all_reduce(tensor, *args, **kwargs)
        works.append(work)
        return work

    dist.all_reduce = logged
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(10 * rank + step)
            x, y = torch.randn(8, 64, generator=g), torch.randint(0, 5, (8,), generator=g)
            phase[0] = ("forward", step)
            out = model(x)
            phase[0] = ("backward", step)
            nn.CrossEntropyLoss()(out, y).backward()
            # held back after backward: launched by nothing yet
            waiting.append(overlap.deferred is not None and overlap.deferred[0].future is None)
            opt.step()
        phase[0] = ("forward", steps)
        ad.distributed.finish_steps(model)
    finally:
        dist.all_reduce = all_reduce
    # per step but the first and last: how many collectives its backward launched, and
    # for each one the next forward launched, whether the collective launched just before
    # it was complete
    return waiting, [(sum(p == ("backward", step) for p, _ in log),
                      [done[-1] for p, done in log if p == ("forward", step + 1)])
                     for step in range(1, steps - 1)], overlap.deferred  # (finish_steps: at once)


def test_the_last_held_collective_waits_for_the_one_before_it():
    """gloo runs two collectives at a time: launched together, the last two held ones
    would share the link and both end with the transfer. The last one is launched from
    the main thread, by the next forward, once the one before it is done; the parameters
    stay those of the usual loop (the other tests)."""
    for waiting, steps, deferred in run_ranks(last_launch_worker, 2):
        assert waiting[0] is False  # the first backward reduces synchronously
        assert all(waiting[1:])
        assert deferred is None  # finish_steps launched and waited for everything
        for in_backward, in_forward in steps:
            assert in_backward >= 3 and in_forward == [True], steps


def refusals_worker(rank, world):
    messages = []
    params = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    for kw in ({"gradient_as_bucket_view": True}, {"find_unused_parameters": True}):
        model = DDP(make_model("mlp"), **kw)
        try:
            ad.distributed.register(model, optimizer=params(model), overlap_forward=True)
        except ValueError as e:
            messages.append(str(e))
    model = DDP(make_model("mlp"))
    for kw in ({"eager_fraction": 0.0}, {"eager_fraction": 1.5}):
        try:
            ad.distributed.forward_overlap(model, default_hooks.allreduce_hook, params(model), **kw)
        except ValueError as e:
            messages.append(str(e))
    try:
        ad.distributed.register(model, overlap_forward=True)
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_refusals():
    for messages in run_ranks(refusals_worker, 2):
        assert len(messages) == 5
        assert "gradient_as_bucket_view" in messages[0]
        assert "find_unused_parameters" in messages[1]
        assert "eager_fraction must be in (0, 1]" in messages[2] and "1.5" in messages[3]
        assert "optimizer" in messages[4]


def copies_worker(rank, world):
    import pickle

    model = DDP(make_model("cnn"), bucket_cap_mb=0.003)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.register_comm_hook(dist.new_group(), ad.distributed.forward_overlap(
        model, default_hooks.allreduce_hook, opt))
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):
        x, y = batch_for("cnn", rank, step)
        loss_fn(model(x), y).backward()
        opt.step()
    overlap = model._approxdist_forward_overlap
    pending = len(overlap.pending)
    # An EMA-style copy and a pickle of the model: neither drags the live reductions
    # along, and running the copy does not step the original.
    twin = copy.deepcopy(model.module)
    restored = pickle.loads(pickle.dumps(model.module))
    with torch.no_grad():
        twin(x), restored(x)
    still_pending = len(overlap.pending)
    with torch.no_grad():
        model.module(x)  # the original's forward steps its buckets
    return pending, still_pending, len(overlap.pending)


def test_copies_and_pickles_of_the_model_carry_inert_hooks():
    for pending, still_pending, after in run_ranks(copies_worker, 2):
        assert pending > 0 and still_pending == pending and after == 0


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_overlap_steps_attention_weights_read_outside_their_module(ratio):
    """nn.MultiheadAttention's exact forward (ratio 1) reads out_proj's weight without
    calling out_proj; the overlapped loop still equals the usual one on a small ViT."""
    results = run_ranks(worker, 2, "vit_small", "sparse", "sgd", {"bucket_cap_mb": 0.003}, ratio, 3)
    _check(results)
