"""Index agreement across ranks: 'check' detects diverged selections, 'broadcast' makes
every rank follow rank 0."""
import copy

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
