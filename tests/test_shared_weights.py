"""Tied weights stay lossless: one Parameter held by several weight-sampled layers.

Each use selects its own channels and the weight's gradient is the sum of theirs, so the
hook must send the union of every use's channels. Two gloo ranks train a sparse-hook and
a plain all-reduce copy of a model whose hidden weight is used by two layers (and a
convolution weight likewise); the parameters must be bitwise equal."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from distharness import run_ranks


class TiedNet(nn.Module):
    """conv_a and conv_b share a weight, as do fc_a and fc_b."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv_b.weight = self.conv_a.weight
        self.fc_a = nn.Linear(32, 32)
        self.fc_b = nn.Linear(32, 32)
        self.fc_b.weight = self.fc_a.weight
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv_b(torch.relu(self.conv_a(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        x = torch.relu(self.fc_b(torch.relu(self.fc_a(x))))
        return self.head(x)


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)


def tied_worker(rank, world, policy, how, steps=3):
    torch.manual_seed(0)
    base = TiedNet()
    models = [ad.convert_model(copy.deepcopy(base), 0.5, distributed=True, policy=policy, seed=3,
                               allow_unbiased=True) for _ in range(2)]
    sparse, dense = DDP(models[0]), DDP(models[1])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    if how == "hook":
        ad.distributed.register(sparse)
    elif how == "optimizer":
        ad.distributed.register(sparse, optimizer=opts[0])
    else:
        ad.distributed.register(sparse, optimizer=opts[0], overlap_forward=True)
    loss_fn = nn.CrossEntropyLoss()
    for ddp, opt in zip((sparse, dense), opts):
        for step in range(steps):
            x, y = _batch(rank, step)
            loss_fn(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        ad.distributed.finish_steps(ddp)
    # The two uses did select different channels (else the test would prove nothing).
    differ = any(not torch.equal(a.last_indices, b.last_indices)
                 for a, b in ((models[0].conv_a, models[0].conv_b), (models[0].fc_a, models[0].fc_b)))
    return {"sparse": [p.detach().clone() for p in models[0].parameters()],
            "dense": [p.detach().clone() for p in models[1].parameters()],
            "uses_differ": differ}


@pytest.mark.parametrize("policy,how", [
    ("bernoulli_weight", "hook"),
    ("topk_explore", "hook"),
    ("bernoulli_weight", "optimizer"),
    ("bernoulli_weight", "overlap_forward"),
])
def test_tied_weights_reduce_the_union_of_their_uses(policy, how):
    results = run_ranks(tied_worker, 2, policy, how)
    for r in results:
        assert r["uses_differ"]
        for ps, pd in zip(r["sparse"], r["dense"]):
            assert torch.equal(ps, pd), (ps - pd).abs().max()
    for a, b in zip(results[0]["sparse"], results[1]["sparse"]):
        assert torch.equal(a, b)


class TiedHead(nn.Module):
    """A language-model shape: the output head holds the embedding's table."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_a_weight_tied_to_an_exact_module_stays_exact():
    # The embedding's gradient reaches every channel of the table, which a sampled head's
    # selection would not cover: convert_model leaves the head exact.
    model = ad.convert_model(TiedHead(), 0.5, distributed=True)
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert isinstance(model.body, ad.nn.ApproxLinearDist)
    # Tied to each other only: both sampled, still one Parameter.
    tied = ad.convert_model(TiedNet(), 0.5, distributed=True)
    assert isinstance(tied.fc_a, ad.nn.ApproxLinearDist) and isinstance(tied.fc_b, ad.nn.ApproxLinearDist)
    assert tied.fc_a.weight is tied.fc_b.weight
    assert isinstance(tied.conv_b, ad.nn.ApproxConv2dDist) and tied.conv_a.weight is tied.conv_b.weight
    # Without the hook (distributed=False) nothing is lost by sampling the head.
    assert isinstance(ad.convert_model(TiedHead(), 0.5).head, ad.nn.ApproxLinear)


def test_tied_union_pops_every_use():
    torch.manual_seed(0)
    model = ad.convert_model(TiedNet(), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True)
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    w = model.fc_a.weight
    union = torch.unique(torch.cat([model.fc_a.last_indices, model.fc_b.last_indices]))
    outside = torch.ones(w.shape[1], dtype=torch.bool)
    outside[union] = False
    assert (w.grad[:, outside] == 0).all()  # the gradient lives in the union...
    got = ad.nn.pop_touched_of(w)
    assert torch.equal(got, union) or (got is None and union.numel() == w.shape[1])
    assert ad.nn.pop_touched_of(w).numel() == 0  # ...and both layers were reset
    assert {id(m) for m in ad.nn.sampled_layers_of(w)} == {id(model.fc_a), id(model.fc_b)}
