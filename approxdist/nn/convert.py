"""convert_model: swap nn.Linear / nn.Conv2d for their approximate forms in place."""
import fnmatch
import logging

import torch
import torch.nn as nn

from ..functional._checks import (
    DIST_POLICIES,
    POLICIES,
    check_explore,
    check_flag,
    check_minimal_k,
    check_mode,
    check_policy,
    check_sample_ratio,
    check_seed,
    check_weight_layout,
)
from ._dist import WeightSampled
from .budget import budget_ratios
from .conv import ApproxConv2d, ApproxConv2dDist
from .linear import ApproxLinear, ApproxLinearDist
from .norm_stats import check_norm_stats, exact_norm_stats, remove_norm_stats

log = logging.getLogger(__name__)
_APPROX = (ApproxLinear, ApproxLinearDist, ApproxConv2d, ApproxConv2dDist)


def _excluded(name, module, exclude):
    for rule in exclude:
        if isinstance(rule, type):
            if isinstance(module, rule):
                return True
        elif isinstance(rule, str):
            if name == rule or fnmatch.fnmatchcase(name, rule):
                return True
        else:
            raise ValueError(f"exclude entries must be module names (str) or types, got {rule!r}")
    return False


def _swap(old, cls, kwargs):
    """The approximate twin of `old`, sharing its Parameter objects (so requires_grad,
    device, dtype and any optimizer that already holds them are kept)."""
    if isinstance(old, nn.Linear):
        new = cls(old.in_features, old.out_features, old.bias is not None, device="meta", **kwargs)
    else:
        new = cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                  old.dilation, old.groups, old.bias is not None, old.padding_mode, device="meta",
                  **kwargs)
    with torch.no_grad():
        new.weight = old.weight
        new.bias = old.bias
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    new._forward_hooks.update(old._forward_hooks)
    new.train(old.training)
    if hasattr(new, "_init_dist"):
        new._init_dist(kwargs["seed"], kwargs["weight_layout"], kwargs["explore"])  # re-register: the weight changed
    else:
        new._init_layout(kwargs["weight_layout"])  # the weight changed
    return new


def _without_shared_with_exact(module, candidates):
    """The candidates whose weight no module left exact also holds. A weight tied to
    one (a head sharing an nn.Embedding's table, a layer tied to an excluded one) gets
    gradient in every channel from that module, so the sparse hook, which sends the
    sampled channels of a sampled layer's weight, would lose it: such a layer stays
    exact. Weights shared between sampled layers are fine (the hook sends the union)."""
    chosen = {id(m) for _, m in candidates}
    held_elsewhere = {id(p) for m in module.modules()
                      if id(m) not in chosen and not isinstance(m, WeightSampled)
                      for p in m.parameters(recurse=False)}
    kept = []
    for name, m in candidates:
        if id(m.weight) in held_elsewhere:
            log.debug("convert_model: %s shares its weight with a module left exact, left exact", name)
            continue
        kept.append((name, m))
    return kept


def convert_model(module, sample_ratio=None, minimal_k=1, *, budget=None, distributed=False, policy=None,
                  mode="forward", skip_first_conv=True, exclude=(), seed=0, weight_layout="input_major",
                  explore=0.25, norm_stats="exact", norm_stats_fraction=0.25, norm_stats_every=1):
    """Replace every nn.Linear / nn.Conv2d under `module` by ApproxLinear / ApproxConv2d
    (their *Dist forms with distributed=True) in place and return the module.

    State_dict keys and values do not change: the new layers take over the old Parameter
    objects. Left exact: the first convolution when skip_first_conv (it sees the raw
    image, whose few channels are all needed), anything named or typed in `exclude`
    (names may be glob patterns), grouped/depthwise convolutions (CRS across groups
    is not defined) and, with distributed=True, a layer whose weight a module left exact
    also holds (a head tied to an embedding: that module's gradient reaches every
    channel, which the sparse hook would not send). Layers that share a weight with each
    other are all converted; the hook sends the union of their channels. With distributed=True the layers choose channels from the weights
    (policy 'topk_weight' by default), or from the weights and a generator seeded with
    seed + layer number, the same on every rank ('topk_explore', whose `explore` share of
    the k channels rotates over all of them; 'bernoulli_weight').

    weight_layout: 'input_major' (default) stores each sampled weight with its input
    channels outermost in memory (values, shapes and Parameter objects unchanged, only
    the strides), so sampling gathers and scatters whole blocks and the sparse hook packs
    whole blocks; a resnet50 step at ratio 0.5 was ~4% faster for it in an A/B
    (docs/benchmarks.md, Compute).
    'contiguous' keeps torch's layout: use it with Horovod, whose collectives need
    contiguous tensors, or with code that calls `.view()` on weights.

    budget: instead of one sample_ratio, the fraction of the model's dense gradient
    elements (every parameter with requires_grad) that the sparse hook sends per step;
    each sampled layer gets its own ratio, c / sqrt(weight size) capped at 1, so the wide
    late layers, which hold most of the bytes, are sampled hardest and small layers stay
    exact (nn/budget.py). The layers' ratios are their `sample_ratio` attributes.

    norm_stats: 'exact' (default) keeps the running statistics of BatchNorm layers fit
    for the exact forward that eval() runs: before each training forward the module runs
    once more without autograd, exactly, on the first `norm_stats_fraction` of the batch,
    and only that forward updates them (nn/norm_stats.py; 19-25% of an exact resnet step
    at batch 16 on a CPU; `norm_stats_every=N` runs it on every N-th training forward
    only). 'sampled' gathers them on the sampled forward, as plain layers would: the eval
    accuracy of a BatchNorm model then falls far below what it learned (resnet18 on
    digits at 0.33: 10.6% against 98.3%). Models without BatchNorm are unaffected.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_flag("distributed", distributed)
    check_flag("skip_first_conv", skip_first_conv)
    check_seed(seed)
    if (sample_ratio is None) == (budget is None):
        raise ValueError("convert_model takes either sample_ratio (one ratio for every layer) or budget "
                         f"(per-layer ratios from a byte budget), got sample_ratio={sample_ratio!r}, budget={budget!r}")
    if sample_ratio is not None:
        check_sample_ratio(sample_ratio)
    check_minimal_k(minimal_k)
    allowed = DIST_POLICIES if distributed else POLICIES
    policy = policy or ("topk_weight" if distributed else "topk")
    check_policy(policy, allowed)
    check_mode(mode, policy)
    check_weight_layout(weight_layout)
    check_norm_stats(norm_stats, norm_stats_fraction, norm_stats_every)
    check_explore(explore)
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    linear_cls, conv_cls = (ApproxLinearDist, ApproxConv2dDist) if distributed else (ApproxLinear, ApproxConv2d)

    first_conv = None
    if skip_first_conv:
        first_conv = next((name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)

    candidates = []
    for name, m in module.named_modules():
        if isinstance(m, _APPROX) or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if type(m) not in (nn.Linear, nn.Conv2d):
            log.debug("convert_model: %s (%s) is a subclass, left as it is", name, type(m).__name__)
            continue
        if _excluded(name, m, exclude):
            log.debug("convert_model: %s excluded, left exact", name)
            continue
        if name == first_conv:
            log.debug("convert_model: %s is the first convolution, left exact", name)
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            log.debug("convert_model: %s has groups=%d, left exact", name, m.groups)
            continue
        candidates.append((name, m))
    if distributed:
        candidates = _without_shared_with_exact(module, candidates)

    if budget is None:
        ratios = [sample_ratio] * len(candidates)
    else:
        dense = sum(p.numel() for p in module.parameters() if p.requires_grad)
        layers = [(m.weight.numel(), m.weight.shape[1]) for _, m in candidates]
        ratios = budget_ratios(layers, dense, budget, minimal_k)

    replaced = {}
    for ordinal, ((name, m), ratio) in enumerate(zip(candidates, ratios)):
        kwargs = dict(sample_ratio=ratio, minimal_k=minimal_k, policy=policy, mode=mode,
                      weight_layout=weight_layout)
        if distributed:
            kwargs.update(seed=seed + ordinal, explore=explore)
        cls = linear_cls if isinstance(m, nn.Linear) else conv_cls
        replaced[name] = _swap(m, cls, kwargs)

    if "" in replaced:
        return replaced[""]
    for name, new in replaced.items():
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)
    if norm_stats == "exact" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        exact_norm_stats(module, norm_stats_fraction, norm_stats_every)
    else:
        remove_norm_stats(module)
    return module
