"""convert_model: swap nn.Linear / nn.Conv2d / nn.MultiheadAttention for their approximate
forms in place."""
import fnmatch
import logging

import torch
import torch.nn as nn

from ..functional._checks import (
    DIST_POLICIES,
    EXACT_FORWARD_MODES,
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
from .attention import ApproxMultiheadAttention, ApproxMultiheadAttentionDist
from .budget import budget_ratios
from .conv import ApproxConv2d, ApproxConv2dDist
from .linear import ApproxLinear, ApproxLinearDist
from .norm_stats import check_norm_stats, exact_norm_stats, norm_stats_of, remove_norm_stats

log = logging.getLogger(__name__)
# The module types convert_model samples, each with its approximate forms (local, distributed).
_FORMS = {
    nn.Linear: (ApproxLinear, ApproxLinearDist),
    nn.Conv2d: (ApproxConv2d, ApproxConv2dDist),
    nn.MultiheadAttention: (ApproxMultiheadAttention, ApproxMultiheadAttentionDist),
}
_SOURCE = {cls: base for base, forms in _FORMS.items() for cls in forms}
_APPROX = tuple(_SOURCE)
# Modules whose forward reads their child Linear layers' weights directly, so a sampled
# child would be bypassed (its gradient dense while the hook sends only its selection):
# torchvision's Swin attention passes qkv.weight and proj.weight to a function. Their
# class is swapped for one that calls the children (nn/_swin.py), whose weights stay
# row-major so that torchvision's own forward (eval) reads them bit-identically.
_READS_CHILD_WEIGHTS = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2",
                        "SampledShiftedWindowAttention", "SampledShiftedWindowAttentionV2")
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


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


def _sampled_weights(m):
    """The weights a conversion of m samples, as (numel, input features): the budget's
    units and the seed ordinals. Attention samples two: in_proj_weight and out_proj."""
    if isinstance(m, nn.MultiheadAttention):
        return [(m.in_proj_weight.numel(), m.embed_dim), (m.out_proj.weight.numel(), m.embed_dim)]
    return [(m.weight.numel(), m.weight.shape[1])]


def _why_exact(name, m, exclude, first_conv):
    """Why convert_model leaves m (a Linear, Conv2d or MultiheadAttention, or a form of
    one) exact, or None when it samples it."""
    if _excluded(name, m, exclude):
        return "excluded"
    if name == first_conv:
        return "the first convolution"
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"groups={m.groups}"
    if isinstance(m, nn.MultiheadAttention) and not m._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v weights)"
    return None


def _take_hooks(new, old):
    for table in _HOOK_TABLES:
        if hasattr(old, table):
            getattr(new, table).update(getattr(old, table))
    new.train(old.training)


def _swap(old, cls, kwargs):
    """The approximate twin of a Linear or Conv2d `old`, sharing its Parameter objects (so
    requires_grad, device, dtype and any optimizer that already holds them are kept)."""
    if isinstance(old, nn.Linear):
        new = cls(old.in_features, old.out_features, old.bias is not None, device="meta", **kwargs)
    else:
        new = cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                  old.dilation, old.groups, old.bias is not None, old.padding_mode, device="meta",
                  **kwargs)
    with torch.no_grad():
        new.weight = old.weight
        new.bias = old.bias
    _take_hooks(new, old)
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
    chosen = {id(sub) for _, m in candidates for sub in m.modules()}
    held_elsewhere = {id(p) for m in module.modules()
                      if id(m) not in chosen and not isinstance(m, WeightSampled)
                      for p in m.parameters(recurse=False)}
    kept = []
    for name, m in candidates:
        own = (m.in_proj_weight, m.out_proj.weight) if isinstance(m, nn.MultiheadAttention) else (m.weight,)
        if any(id(w) in held_elsewhere for w in own):
            log.debug("convert_model: %s shares its weight with a module left exact, left exact", name)
            continue
        kept.append((name, m))
    return kept


def _swap_attention(old, cls, linear_cls, kwargs):
    """The sampled twin of an nn.MultiheadAttention, sharing its Parameters; kwargs holds
    one set of layer arguments per sampled weight (input projection, out_proj). Both
    weights keep torch's layout (attention.py)."""
    kw_in, kw_out = (dict(kw, weight_layout="contiguous") for kw in kwargs)
    ctor = {k: v for k, v in kw_in.items() if k != "weight_layout"}
    new = cls(old.embed_dim, old.num_heads, old.dropout, old.in_proj_bias is not None, old.bias_k is not None,
              old.add_zero_attn, old.kdim, old.vdim, old.batch_first, device="meta", **ctor)
    with torch.no_grad():
        for pname in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
            setattr(new, pname, getattr(old, pname))
    new.out_proj = _swap(old.out_proj, linear_cls, kw_out)
    _take_hooks(new, old)
    if hasattr(new, "_init_dist"):
        new._init_dist(kw_in["seed"], "contiguous", kw_in["explore"])  # re-register: the weight changed
    return new


def _reconfigure(layer, kwargs):
    """Apply a later convert_model call's arguments to a layer it converted earlier."""
    layer._init_sampling(kwargs["sample_ratio"], kwargs["minimal_k"], kwargs["policy"], kwargs["mode"])
    if "seed" in kwargs:
        layer.explore = kwargs["explore"]
        if layer.seed != kwargs["seed"]:
            layer.load_sampler_state({"seed": kwargs["seed"], "generator": None, "rotation": None})
        layer.discard_prepared()
    layer._init_layout(kwargs["weight_layout"])


def _convert_one(m, distributed, kwargs):
    """m converted (a new module) or, when it is the wanted form already, reconfigured in
    place (None). kwargs: one set of layer arguments per weight it samples."""
    wanted = _FORMS[_SOURCE.get(type(m), type(m))][int(distributed)]
    if isinstance(m, nn.MultiheadAttention):
        if type(m) is wanted:
            _reconfigure(m, dict(kwargs[0], weight_layout="contiguous"))
            _reconfigure(m.out_proj, dict(kwargs[1], weight_layout="contiguous"))
            return None
        return _swap_attention(m, wanted, _FORMS[nn.Linear][int(distributed)], kwargs)
    if type(m) is wanted:
        _reconfigure(m, kwargs[0])
        return None
    return _swap(m, wanted, kwargs[0])


def _plan(module, exclude, skip_first_conv, distributed):
    """The modules to convert, [(name, module)], in module order. Raises before anything
    changes when an earlier conversion conflicts with this one; logs (debug) every
    module with weights that stays exact, and why."""
    first_conv = None
    if skip_first_conv:
        first_conv = next((name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
    wanted = 1 if distributed else 0
    candidates, inside, windows = [], [], []  # inside: modules whose children are not converted on their own
    for name, m in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        base = _SOURCE.get(type(m), type(m) if type(m) in _FORMS else None)
        if type(m).__name__ in _READS_CHILD_WEIGHTS and type(m).__module__.startswith(("torchvision.", __package__)):
            if _excluded(name, m, exclude):
                log.debug("convert_model: %s (%s) excluded, left exact with its layers", name, type(m).__name__)
                inside.append(name)
            else:
                windows.append((name, m))
            continue
        if base is None:
            own = [p for p, t in m.named_parameters(recurse=False) if t is not None and t.dim() >= 2]
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and not isinstance(m, _APPROX):
                log.debug("convert_model: %s (%s) is a subclass, left exact", name, type(m).__name__)
            elif own:
                log.debug("convert_model: %s (%s) is not a type it samples, left exact: %s", name,
                          type(m).__name__, ", ".join(own))
            if isinstance(m, nn.MultiheadAttention):
                inside.append(name)
            continue
        if base is nn.MultiheadAttention:
            inside.append(name)
        why = _why_exact(name, m, exclude, first_conv)
        if isinstance(m, _APPROX):
            if why is not None:
                raise ValueError(f"convert_model: {name!r} was sampled by an earlier call but this one leaves it "
                                 f"exact ({why}); convert the original model instead")
            if type(m) is not _FORMS[base][wanted]:
                raise ValueError(f"convert_model: {name!r} was converted with distributed={not distributed} "
                                 f"({type(m).__name__}); convert the original model for distributed={distributed}")
        elif why is not None:
            log.debug("convert_model: %s (%s) left exact: %s", name, type(m).__name__, why)
            continue
        candidates.append((name, m))
    return candidates, windows


def convert_model(module, sample_ratio=None, minimal_k=1, *, budget=None, distributed=False, policy=None,
                  mode=None, skip_first_conv=True, exclude=(), seed=0, weight_layout="input_major",
                  explore=0.1, norm_stats="exact", norm_stats_fraction=0.25, norm_stats_every=1,
                  allow_unbiased=False):
    """Replace every nn.Linear / nn.Conv2d / nn.MultiheadAttention under `module` by
    ApproxLinear / ApproxConv2d / ApproxMultiheadAttention (their *Dist forms with
    distributed=True) in place and return the module. An attention module's two sampled
    weights (in_proj_weight, out_proj.weight) count as two layers for `budget` and seeds.
    torchvision's Swin attention, which reads its qkv/proj weights directly, gets a
    subclass that calls them (nn/_swin.py).

    Called again on a converted module, it applies its arguments to the layers an
    earlier call converted (ratio, minimal_k, policy, mode, seed, explore, layout; the
    same arguments change nothing), and raises ValueError, before changing anything,
    where the two calls conflict: another `distributed`, or a sampled layer this call
    would leave exact. Every other module with weights (Conv1d, Embedding, subclasses of
    the sampled types, ...) stays exact, with one debug log line naming it.

    State_dict keys and values do not change: the new layers take over the old Parameter
    objects. Left exact: the first convolution when skip_first_conv (it sees the raw
    image, whose few channels are all needed), anything named or typed in `exclude`
    (names may be glob patterns), grouped/depthwise convolutions (CRS across groups
    is not defined) and, with distributed=True, a layer whose weight a module left exact
    also holds (a head tied to an embedding: that module's gradient reaches every
    channel, which the sparse hook would not send). Layers that share a weight with each
    other are all converted; the hook sends the union of their channels. With distributed=True the layers choose channels from the weights
    and a generator seeded with seed + layer number, the same on every rank: by default
    'topk_explore', the top channels by weight norm with an `explore` share of the k
    taken from a rotation over all of them, so every weight trains ('topk_weight' keeps
    the top k by norm, which settles on a fixed third of the channels at 0.33 and leaves
    the rest untrained; 'bernoulli_weight').

    allow_unbiased: with distributed=True, policy 'bernoulli_weight' below ratio 1 is
    refused unless this is True: it scales each kept channel's weight gradient by 1/p
    (about 1/ratio), and on the digits CNN at lr 0.1 that variance made training diverge at
    ratios 0.5 and 0.33, with the sampled forward and with the exact one (docs/design.md).

    mode: None (default) is 'weight_grad' with distributed=True and 'forward' without.
    'weight_grad' runs the exact forward and input gradient and computes the weight
    gradient of the selected channels only: the sparse hook sends exactly as few bytes as
    in 'forward' mode, and the model trains the function that eval() runs, so it
    evaluates as it learned (a small ViT under AdamW at 0.5: 96.9% against 43.3% in
    'forward' mode, exact 97.2%; docs/benchmarks.md, Fidelity). What it gives up is the
    compute of 'forward' mode, which samples the forward and the input gradient too:
    use that on a compute-bound machine, at the accuracy cost that table shows.

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
    policy = policy or ("topk_explore" if distributed else "topk")
    mode = mode or ("weight_grad" if distributed else "forward")
    check_policy(policy, allowed)
    check_mode(mode, policy)
    check_flag("allow_unbiased", allow_unbiased)
    if distributed and policy == "bernoulli_weight" and not allow_unbiased \
            and (budget is not None or sample_ratio < 1):
        raise ValueError(
            "convert_model: policy='bernoulli_weight' scales each kept channel's gradient by 1/p (about "
            "1/ratio), and that variance made the digits CNN diverge at lr 0.1 and ratios 0.5 and 0.33 "
            "(docs/design.md); use 'topk_weight' or 'topk_explore', or pass allow_unbiased=True")
    check_weight_layout(weight_layout)
    check_norm_stats(norm_stats, norm_stats_fraction, norm_stats_every)
    check_explore(explore)
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    candidates, windows = _plan(module, exclude, skip_first_conv, distributed)
    if distributed:
        candidates = _without_shared_with_exact(module, candidates)
    row_major = tuple(name + "." for name, _ in windows)  # their layers' weights stay row-major
    weights = [_sampled_weights(m) for _, m in candidates]
    layers = [w for ws in weights for w in ws]
    if budget is None:
        ratios = [sample_ratio] * len(layers)
    else:
        dense = sum(p.numel() for p in module.parameters() if p.requires_grad)
        ratios = budget_ratios(layers, dense, budget, minimal_k)

    replaced, ordinal = {}, 0
    for (name, m), ws in zip(candidates, weights):
        kwargs = []
        for _ in ws:
            kw = dict(sample_ratio=ratios[ordinal], minimal_k=minimal_k, policy=policy, mode=mode,
                      weight_layout="contiguous" if name.startswith(row_major) else weight_layout)
            if distributed:
                kw.update(seed=seed + ordinal, explore=explore)
            kwargs.append(kw)
            ordinal += 1
        new = _convert_one(m, distributed, kwargs)
        if new is not None:
            replaced[name] = new

    if windows:
        from ._swin import SAMPLED

        for _, m in windows:
            m.__class__ = SAMPLED.get(type(m), type(m))
    if "" in replaced:
        return replaced[""]
    for name, new in replaced.items():
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)
    # (an exact training forward, mode 'weight_grad', gathers exact statistics itself)
    if norm_stats == "exact" and mode not in EXACT_FORWARD_MODES \
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        current = norm_stats_of(module)
        if current is None or (current.fraction, current.every) != (float(norm_stats_fraction), norm_stats_every):
            exact_norm_stats(module, norm_stats_fraction, norm_stats_every)
    else:
        remove_norm_stats(module)
    return module
