"""Exact steps in a sampled run: a warm-up, periodic exact steps, exact last steps.

A sampled layer trains a perturbed model; how much the perturbation costs depends on
when it happens. Early steps move the weights most (and, for the weight-norm selection,
decide which channels the top-k keeps from then on); the last steps decide what the
exported model is. A schedule runs chosen training steps exactly (every channel, k == n,
as PowerSGD's `start_powerSGD_iter` runs plain all-reduce for its first iterations) and
samples the others.

`set_sampling(model, enabled)` is the switch: it sets `sampling_enabled` on every sampled
layer. During an exact step a weight-sampled layer selects every channel on every rank
(no draw from its generator, no move of its rotation), records them all, and the sparse
hook sends its whole gradient: an exact step costs the dense bytes, and the hook's
counters say so. BatchNorm statistics come from the exact training forward itself then
(norm_stats.py finds no sampled layer and runs no extra pass).

`SamplingSchedule` drives the switch from a count of training forwards: forwards of the
model in training mode with autograd on. Evaluation, `no_grad` forwards (logging, the
BatchNorm statistics pass) do not count, so every rank counts the same. It is a forward
pre-hook on the model's root registered ahead of the others (the statistics pass must
see this forward's setting) and a forward hook that sets the next forward's setting as
soon as this one ends, so a selection prepared during the step
(`WeightSampled.prepare_next`) is prepared for what the next forward runs. With gradient
accumulation over A micro-batches, count A forwards per optimizer step. Its count
travels in `sampler_state(model)` (under the key "#schedule"), so a resumed run switches
at the same steps.
"""
import weakref

import torch

from ._config import SamplingConfig

SCHEDULE_KEY = "#schedule"  # its entry in sampler_state (no module name holds a '#')


def sampled_layers(model):
    return [m for m in model.modules() if isinstance(m, SamplingConfig)]


def set_sampling(model, enabled):
    """Every sampled layer under `model` trains sampled (True) or exactly (False, k == n)
    from its next training forward on. Returns the number of layers switched to it."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    layers = sampled_layers(model)
    changed = sum(m.sampling_enabled != enabled for m in layers)
    for m in layers:
        m.sampling_enabled = enabled
    return changed


def _count(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0{' or None' if allow_none else ''}, got {value!r}")
    return value


class SamplingSchedule:
    """Which training forwards of `model` run exactly; attached to it on construction
    (any schedule attached before is removed).

    warmup: the first `warmup` forwards are exact.
    exact_every: every `exact_every`-th forward is exact (forwards exact_every - 1,
        2 * exact_every - 1, ... counted from 0); 0 for none.
    exact_last: the forwards from `total - exact_last` on are exact; needs `total`.
    total: the run's length in training forwards (for exact_last).

    `exact_at(i)` says whether forward i (from 0) is exact; `forwards` counts those seen.
    `remove()` detaches it and leaves the layers sampled. Like norm_stats' hooks it holds
    no strong reference to the model, so copies and pickles carry their own schedule.
    """

    def __init__(self, model, *, warmup=0, exact_every=0, exact_last=0, total=None):
        self.warmup = _count("warmup", warmup)
        self.exact_every = _count("exact_every", exact_every)
        self.exact_last = _count("exact_last", exact_last)
        self.total = _count("total", total, allow_none=True)
        if self.exact_last and self.total is None:
            raise ValueError("exact_last needs total (the run's length in training forwards), got total=None")
        if not sampled_layers(model):
            raise ValueError("SamplingSchedule: the model has no sampled layer (convert_model it first)")
        remove_schedule(model)
        self.forwards = 0
        self._reset()
        self._model = weakref.ref(model)
        model.register_forward_pre_hook(self._pre, prepend=True)
        model.register_forward_hook(self._post, always_call=True)
        self._apply(model)

    def _reset(self):
        self._model = None
        self._depth = 0  # nesting of the model's forwards (the BatchNorm statistics pass)
        self._counting = False

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("warmup", "exact_every", "exact_last", "total", "forwards")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def exact_at(self, i):
        if i < self.warmup:
            return True
        if self.exact_every and (i + 1) % self.exact_every == 0:
            return True
        return self.total is not None and self.exact_last > 0 and i >= self.total - self.exact_last

    def _apply(self, model):
        enabled = not self.exact_at(self.forwards)
        for m in sampled_layers(model):
            m.sampling_enabled = enabled

    def _pre(self, module, args):
        self._model = weakref.ref(module)
        self._depth += 1
        if self._depth == 1 and module.training and torch.is_grad_enabled():
            self._counting = True
            self._apply(module)

    def _post(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._counting:
            self._counting = False
            self.forwards += 1
            self._apply(module)  # the next forward's setting, for selections prepared before it

    def state_dict(self):
        return {"forwards": self.forwards}

    def load_state_dict(self, state):
        self.forwards = _count("forwards", state["forwards"])
        model = self._model() if self._model is not None else None
        if model is not None:
            self._apply(model)

    def remove(self):
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for table in (model._forward_pre_hooks, model._forward_hooks):
            for key, fn in list(table.items()):
                if getattr(fn, "__self__", None) is self:
                    del table[key]
                    model._forward_hooks_always_called.pop(key, None)
        set_sampling(model, True)
        self._model = None

    def __repr__(self):
        return (f"SamplingSchedule(warmup={self.warmup}, exact_every={self.exact_every}, "
                f"exact_last={self.exact_last}, total={self.total}, forwards={self.forwards})")


def schedule_of(model):
    """The SamplingSchedule attached to `model`, or None."""
    for fn in model._forward_pre_hooks.values():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, SamplingSchedule):
            owner._model = weakref.ref(model)  # (a copy's or an unpickled one's)
            return owner
    return None


def remove_schedule(model):
    old = schedule_of(model)
    if old is not None:
        old.remove()


__all__ = ["SamplingSchedule", "set_sampling", "schedule_of", "remove_schedule", "SCHEDULE_KEY"]
