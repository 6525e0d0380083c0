"""Index agreement across ranks: 'check' detects diverged selections, 'broadcast' makes
every rank follow rank 0."""
import copy
import re

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from approxdist.distributed.agreement import install_broadcast
from approxdist.nn import WeightSampled
from distharness import RankError, run_ranks
from models import batch_for, make_model


def _perturb(model, rank):
    # Rank 1 scales half of conv2's input channels up, so its top-k by weight norm differs.
    if rank == 1:
        with torch.no_grad():
            w = model.conv2.weight
            w[:, : w.shape[1] // 2] *= 10


def check_worker(rank, world, check_every):
    model = ad.convert_model(make_model("cnn"), 0.5, distributed=True)
    ddp = DDP(model)
    _perturb(model, rank)
    state = ad.distributed.register(ddp, ad.distributed.SparseAllReduceState(agreement="check",
                                                                             check_every=check_every))
    loss_fn = nn.CrossEntropyLoss()
    for step in range(2 * check_every):
        x, y = batch_for("cnn", rank, step)
        loss_fn(ddp(x), y).backward()
    return state.stats


def test_check_detects_divergence_and_names_the_layer():
    with pytest.raises(RankError, match=r"IndexMismatchError.*'conv2'"):
        run_ranks(check_worker, 2, 3)


def agree_worker(rank, world):
    model = ad.convert_model(make_model("cnn"), 0.5, distributed=True)
    ddp = DDP(model)
    state = ad.distributed.register(ddp, ad.distributed.SparseAllReduceState(agreement="check", check_every=1))
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):
        x, y = batch_for("cnn", rank, step)
        loss_fn(ddp(x), y).backward()
    return state.stats


def test_check_passes_when_ranks_agree():
    stats = run_ranks(agree_worker, 2)
    assert stats[0]["checks"] > 0 and stats[0]["steps"] == 3


def broadcast_worker(rank, world):
    base = make_model("cnn")
    models = [ad.convert_model(copy.deepcopy(base), 0.5, distributed=True) for _ in range(2)]
    sparse, dense = DDP(models[0]), DDP(models[1])
    for m in models:
        _perturb(m, rank)
    ad.distributed.register(sparse, ad.distributed.SparseAllReduceState(agreement="broadcast"))
    for layer in models[1].modules():  # the dense reference follows rank 0 too
        if isinstance(layer, WeightSampled):
            install_broadcast(layer, None)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (sparse, dense)]
    loss_fn = nn.CrossEntropyLoss()
    for ddp, opt in zip((sparse, dense), opts):
        for step in range(3):
            x, y = batch_for("cnn", rank, step)
            loss_fn(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
    local = ad.functional.select_columns(ad.functional.channel_norms(models[0].conv2.weight.detach(), 1),
                                         models[0].conv2.weight.shape[1] // 2, "topk_weight")[0]
    return {
        "indices": [m.last_indices for m in models[0].modules() if isinstance(m, WeightSampled)],
        "local_conv2": local,
        "sparse": [p.detach().clone() for p in models[0].parameters()],
        "dense": [p.detach().clone() for p in models[1].parameters()],
    }


def test_broadcast_follows_rank0():
    r0, r1 = run_ranks(broadcast_worker, 2)
    for a, b in zip(r0["indices"], r1["indices"]):
        assert torch.equal(a, b)
    assert not torch.equal(r0["local_conv2"], r1["local_conv2"]), "perturbation had no effect"
    for r in (r0, r1):
        for ps, pd in zip(r["sparse"], r["dense"]):
            assert torch.equal(ps, pd)


def _diverge(ddp, model, rank, how):
    """Make rank 1 select other channels than rank 0 in the next step."""
    if rank != 1:
        return
    if how == "extra_forward":  # a training forward that records a gradient, on rank 1 only
        model(batch_for("cnn", rank, 99)[0])
    else:  # a selection perturbed directly: conv2 touched one channel more, or one less
        layer = model.conv2
        flip = int((~layer._touched).nonzero()[0]) if not layer._touched.all() else 0
        layer._touched[flip] = ~layer._touched[flip]


def size_mismatch_worker(rank, world, agreement, how, direct=False):
    model = ad.convert_model(make_model("cnn"), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True)
    ddp = DDP(model)
    state = ad.distributed.SparseAllReduceState(agreement=agreement, check_every=2)
    if direct:  # without register(): bucket by bucket in the first step, then once per step
        ddp.register_comm_hook(state, ad.distributed.sparse_allreduce_hook)
    else:  # register() knows every sampled weight: compared once per step
        ad.distributed.register(ddp, state)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):
        x, y = batch_for("cnn", rank, step)
        out = ddp(x)
        if step == 1:
            _diverge(ddp, model, rank, how)
        try:
            loss_fn(out, y).backward()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            return {"step": step, "error": f"{type(exc).__name__}: {exc}"}
    return {"step": None, "error": None}


@pytest.mark.parametrize("agreement,how", [
    ("local", "extra_forward"),
    ("local", "perturbed"),
    ("check", "extra_forward"),  # step 1 is not a check step (check_every=2): the size check
    ("broadcast", "perturbed"),
    ("local-direct", "perturbed"),  # the hook registered without register()
])
def test_payload_size_mismatch_is_an_error_naming_the_layer(agreement, how):
    # Before the size check gloo aborted: "Received data size doesn't match expected size".
    direct = agreement.endswith("-direct")
    for r in run_ranks(size_mismatch_worker, 2, agreement.removesuffix("-direct"), how, direct):
        assert r["step"] == 1
        assert r["error"].startswith("PayloadSizeError: ")
        assert "'conv2'" in r["error"] or how == "extra_forward" or direct  # (direct: no names)
        assert re.search(r"layer '[^']+': \d+ elements on this rank, \d+ to \d+ across ranks", r["error"])


class SideUse(nn.Module):
    """fc's weight is also read directly, outside the sampled layer: its gradient then
    reaches channels fc did not select, which the sparse hook would not send."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x) + nn.functional.linear(x, self.fc.weight)))


def side_use_worker(rank, world, keep_grads):
    torch.manual_seed(0)
    model = ad.convert_model(SideUse(), 0.5, distributed=True) if not keep_grads else \
        ad.convert_model(make_model("mlp"), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True)
    ddp = DDP(model)
    state = ad.distributed.register(ddp, ad.distributed.SparseAllReduceState(agreement="check", check_every=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        g = torch.Generator().manual_seed(10 * rank + step)
        x = torch.randn(4, 16 if not keep_grads else 32, generator=g)
        try:
            ddp(x).square().mean().backward()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            return f"{type(exc).__name__}: {exc}"
        opt.step()  # gradients never cleared (keep_grads): identical outside parts on every rank
    fc2 = model.fc2
    outside = torch.ones(fc2.weight.shape[1], dtype=torch.bool)
    outside[fc2.last_indices] = False
    assert keep_grads is False or bool((fc2.weight.grad[:, outside] != 0).any())  # the case is real
    return state.stats["checks"]


def test_check_detects_a_weight_used_outside_its_layer():
    for r in run_ranks(side_use_worker, 2, False):
        assert r.startswith("UnsampledGradientError: ") and "'fc'" in r, r


def test_check_accepts_gradients_kept_across_steps():
    # Never-cleared gradients are non-zero outside the selection, but the same on every rank.
    assert all(r == 3 for r in run_ranks(side_use_worker, 2, True))
