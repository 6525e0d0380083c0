"""Normalisation statistics that fit the exact forward.

A sampled training forward computes each sampled layer over k of its n input channels,
so the activations that reach a BatchNorm are not those of the exact forward that
`model.eval()` runs (and that plain torchvision runs on the exported state_dict). Running
statistics gathered on the sampled forward then normalise the exact activations wrongly:
a resnet18 trained at ratio 0.5 evaluated at 59% although it had learned 91%.

ExactNormStats keeps the two apart. Before each training forward (autograd on) of the
module it is attached to, it runs that module once more under `no_grad` on the first
`fraction` of the batch with every sampled layer exact, and BatchNorm layers in training
mode update their running statistics from it; the training forward itself then normalises
with its own batch statistics (what its gradients need) and leaves the running statistics
alone. The cost is one gradient-free exact forward over `fraction` of the batch every
`every` training forwards: at 0.25 and every forward, 19-25% of an exact resnet step at
batch 16 on a CPU (experiments/tools/ab_norm_stats.py; a small batch runs convolutions
less efficiently, and the sampled layers' exact path takes a row-major copy of each
weight). `every=4` cuts that to a quarter; the running averages (momentum 0.1) then see
an update every 4 steps. The selection stream is untouched: the extra forward runs the
sampled layers in eval mode, which draws nothing.

The hook finds the layers through the module it is called on, holding no reference to
them, so deep copies and pickles of the model carry a working hook of their own.
"""
import math

import torch
from torch import nn

from ..functional._checks import EXACT_FORWARD_MODES
from ._config import SamplingConfig

_BN = nn.modules.batchnorm._BatchNorm
NORM_STATS = ("exact", "sampled")


def check_norm_stats(norm_stats, fraction, every=1):
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"norm_stats_every must be an integer >= 1, got {every!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or math.isnan(fraction) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"norm_stats_fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def _norms_and_sampled(module):
    """One walk over the module: the BatchNorms in training that track running statistics,
    and the sampled layers that would compute over fewer than all their input channels."""
    norms, sampled = [], []
    for m in module.modules():
        if isinstance(m, _BN):
            if m.running_mean is not None and m.training and m.track_running_stats:
                norms.append(m)
        elif isinstance(m, SamplingConfig) and m.training and getattr(m, "weight", None) is not None \
                and m.mode not in EXACT_FORWARD_MODES:
            n = m.weight.shape[1]
            if m.num_samples_of(n) < n:
                sampled.append(m)
    return norms, sampled


def _batch_slice(args, kwargs, fraction):
    """The first `fraction` of the batch (at least 2 samples, which BatchNorm needs in
    training): every tensor argument whose first dimension is the first tensor
    argument's, cut along dim 0; None when there is no tensor."""
    flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not flat:
        return None
    n = flat[0].shape[0]
    m = min(n, max(2, math.ceil(fraction * n)))

    def cut(a):
        return a[:m] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else a

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class ExactNormStats:
    """Forward pre- and post-hook pair (see the module docstring); attach with
    `exact_norm_stats(module)` or through `convert_model(norm_stats="exact")`."""

    def __init__(self, fraction=0.25, every=1):
        self.fraction = check_norm_stats("exact", fraction, every)
        self.every = every
        self._forwards = 0  # training forwards seen; the exact pass runs on every `every`-th
        self._busy = False
        self._frozen = []

    def __getstate__(self):
        return {"fraction": self.fraction, "every": self.every, "forwards": self._forwards}

    def __setstate__(self, state):
        self.__init__(state["fraction"], state.get("every", 1))
        self._forwards = state.get("forwards", 0)

    def _thaw(self):
        for bn in self._frozen:
            bn.track_running_stats = True
        self._frozen = []

    def pre(self, module, args, kwargs):
        self._thaw()  # a forward that raised left them frozen
        if self._busy or not module.training or not torch.is_grad_enabled():
            return None
        norms, sampled = _norms_and_sampled(module)
        if not norms or not sampled:
            return None
        run, self._forwards = self._forwards % self.every == 0, self._forwards + 1
        cut = _batch_slice(args, kwargs, self.fraction) if run else None
        if cut is not None:
            self._exact_pass(module, sampled, cut)
        for bn in norms:  # the training forward: batch statistics, running ones untouched
            bn.track_running_stats = False
        self._frozen = norms
        return None

    def _exact_pass(self, module, sampled, cut):
        self._busy = True
        try:
            with torch.no_grad():
                for layer in sampled:
                    layer.training = False
                module(*cut[0], **cut[1])
        finally:
            for layer in sampled:
                layer.training = True
            self._busy = False

    def post(self, module, args, kwargs, output):
        if not self._busy:
            self._thaw()
        return None


def exact_norm_stats(module, fraction=0.25, every=1):
    """Attach ExactNormStats to `module` (the model's root, so that one extra forward
    covers every BatchNorm); returns the two hook handles. Any earlier one is replaced."""
    remove_norm_stats(module)
    hooks = ExactNormStats(fraction, every)
    return (module.register_forward_pre_hook(hooks.pre, with_kwargs=True),
            module.register_forward_hook(hooks.post, with_kwargs=True))


def remove_norm_stats(module):
    for table in (module._forward_pre_hooks, module._forward_hooks):
        for key, fn in list(table.items()):
            if isinstance(getattr(fn, "__self__", None), ExactNormStats):
                del table[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)


def norm_stats_of(module):
    """The ExactNormStats attached to `module`, or None."""
    for fn in module._forward_pre_hooks.values():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, ExactNormStats):
            return owner
    return None


__all__ = ["ExactNormStats", "exact_norm_stats", "remove_norm_stats", "norm_stats_of", "NORM_STATS"]
