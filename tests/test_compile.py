"""torch.compile of a converted model: training gives the parameters of eager training
(within float32 tolerance: compiled kernels may sum in another order), selects the same
channels, and the distributed layers add no graph break of their own."""
import copy

import pytest
import torch
import torch.nn as nn

import approxdist as ad
from models import make_model


def _train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("distributed,policy", [pytest.param(False, "topk", marks=pytest.mark.slow),
                                               (True, "topk_weight"), (True, None)],
                         ids=["local", "dist-topk_weight", "dist-default"])
def test_compiled_training_equals_eager(distributed, policy):
    torch._dynamo.reset()
    base = ad.convert_model(make_model("cnn"), 0.5, distributed=distributed, policy=policy)
    eager, compiled = base, copy.deepcopy(base)
    _train(eager)
    _train(torch.compile(compiled, backend="aot_eager"))
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(eager.modules(), compiled.modules()):
        if isinstance(a, ad.nn.WeightSampled):
            assert torch.equal(a.last_indices, b.last_indices)


@pytest.mark.parametrize("policy", ["topk_weight", "topk_explore"])
def test_distributed_layers_add_no_graph_break(policy):
    """A weight-sampled layer's forward used to read the weak registry map (one break per
    layer), and the default 'topk_explore' walked its rotation in Python, reading tensor
    values (7 breaks on this model); a plain Linear model compiles to one graph, so must
    its converted form, also on the calls after the first (the rotation has moved)."""
    torch._dynamo.reset()
    model = ad.convert_model(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                           nn.Linear(32, 4)), 0.5, distributed=True, policy=policy).train()
    for _ in range(2):
        explained = torch._dynamo.explain(model)(torch.randn(4, 16))
        assert explained.graph_break_count == 0, explained.break_reasons
    # a copy registers its new weights when it is made, not in its first compiled forward
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(model))(torch.randn(4, 16))
    assert explained.graph_break_count == 0, explained.break_reasons


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    base = ad.convert_model(make_model("cnn"), 0.5, distributed=True)
    out = {}
    for compiled in (False, True):
        ddp = DDP(copy.deepcopy(base))
        state = ad.distributed.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        run = torch.compile(ddp, backend="aot_eager") if compiled else ddp
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
            opt.zero_grad()
        out[compiled] = ([p.detach().clone() for p in ddp.parameters()], state.stats["payload_bytes"])
    return out


@pytest.mark.slow
def test_compiled_ddp_with_the_sparse_hook_equals_eager():
    from distharness import run_ranks

    for r in run_ranks(_ddp_worker, 2):
        (eager, sent), (compiled, sent_compiled) = r[False], r[True]
        assert sent_compiled == sent
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compiled_copy_of_a_converted_vit_trains_like_eager():
    """A deep copy's layers register on their first forward. Traced by dynamo, that
    registration guarded on the registry's weak sets, and building the guard failed
    ("IndexError: set index out of range") once a set had lost a member (here the copy
    that torch._dynamo.explain ran). Registration now runs outside the graph."""
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10)
    base = ad.convert_model(vit, 0.5, distributed=True).train()
    x = torch.randn(4, 3, 32, 32)
    torch._dynamo.explain(copy.deepcopy(base))(x)  # a copy that registers, then dies
    torch._dynamo.reset()
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    run = torch.compile(compiled, backend="aot_eager")
    for model in (run, eager):  # compiled first: an eager forward would clean the registry up first
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)),
                                        torch.randint(0, 10, (4,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
