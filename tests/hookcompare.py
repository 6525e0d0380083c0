"""The sparse hook against DDP's own all-reduce on real gloo ranks, for whole models
whose forward draws from the global RNG (dropout, stochastic depth): both runs see the
same batches and the same masks, so their parameters must agree bit for bit on 2 ranks."""
import copy

import torch
import torch.nn as nn

import approxdist as ad
from distharness import run_ranks
from models import analytic_bytes, batch_for, make_model

# timm models by test name: timm's own layers (its Attention's qkv/proj Linears around
# F.scaled_dot_product_attention, its stem and blocks), small enough for 2 ranks on a CPU.
TIMM = {"timm_vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.1}),
        "timm_resnet": ("resnet10t", {})}


def build(name):
    if name in TIMM:
        import timm

        arch, kwargs = TIMM[name]
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    if name == "vit_small":  # torchvision's class, small: 32 px images, 16 tokens of 32 features
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10, dropout=0.1, attention_dropout=0.1)
    return make_model(name)


def _worker(rank, world, name, ratio, steps, policy):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    base = build(name)
    models = [ad.convert_model(copy.deepcopy(base), ratio, distributed=True, seed=7, policy=policy,
                              allow_unbiased=True)
              for _ in range(2)]
    sparse, dense = DDP(models[0]), DDP(models[1])
    state = ad.distributed.register(sparse)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (sparse, dense)]
    for step in range(steps):
        x, y = batch_for(name, rank, step)
        for ddp, opt in zip((sparse, dense), opts):
            torch.manual_seed(step)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    return {"sparse": [p.detach().clone() for p in models[0].parameters()],
            "dense": [p.detach().clone() for p in models[1].parameters()],
            "payload": state.stats["payload_bytes"], "analytic": analytic_bytes(models[0]) * steps,
            "dense_bytes": sum(p.numel() * p.element_size() for p in models[0].parameters()) * steps}


def assert_hook_equals_allreduce(name, ratio=0.33, steps=2, policy="topk_weight"):
    """Returns rank 0's record after checking: parameters bitwise equal between the two
    runs and between the ranks, payload equal to the analytic count and below dense."""
    results = run_ranks(_worker, 2, name, ratio, steps, policy)
    for r in results:
        for ps, pd in zip(r["sparse"], r["dense"]):
            assert torch.equal(ps, pd), (ps - pd).abs().max()
        assert r["payload"] == r["analytic"] < r["dense_bytes"]
    for a, b in zip(results[0]["sparse"], results[1]["sparse"]):
        assert torch.equal(a, b), "ranks disagree"
    return results[0]
