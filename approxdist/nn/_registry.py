"""Which parameters belong to weight-sampled layers.

The comm hook receives bare gradient buckets; this weak map lets it find the layers of a
weight (and so its selected channels) without holding the model or keying on bucket
positions, which DDP changes when it rebuilds buckets after the first iteration.

One weight may belong to several layers (tied weights: two modules holding one
Parameter). Each selects its own channels, and the weight's gradient is the sum of
theirs, so the hook must send the union of their selections: the map keeps every
layer of a weight, not the last one registered."""
import weakref

import torch

_LAYERS = {}  # id(weight) -> WeakSet of the layers holding it


@torch.compiler.disable  # dynamo would guard on the weak sets' members, which die at will
def register_sampled(layer):
    """Add `layer` to the layers of its weight. Under torch.compile it runs outside the
    graph: traced, dynamo guarded on the members of every weak set it iterated, and a set
    that lost a member (a copy of the model collected) failed the guard's own build with
    "IndexError: set index out of range" (a converted ViT deep-copied, then compiled)."""
    key = id(layer.weight)
    layers = _LAYERS.get(key)
    if layers is None:
        for stale in [k for k, s in _LAYERS.items() if not s]:  # weights whose layers are gone
            del _LAYERS[stale]
        layers = _LAYERS[key] = weakref.WeakSet()
    layers.add(layer)
    layer._registered_id = key


def is_registered(layer):
    """Whether `layer` is among sampled_layers_of(layer.weight). Under torch.compile, which
    cannot trace a weakref call (a graph break per layer), it compares the weight's id with
    the one the layer was registered under: a copy or an unpickled layer carries the
    original's."""
    if torch.compiler.is_compiling():
        return getattr(layer, "_registered_id", None) == id(layer.weight)
    return layer in sampled_layers_of(layer.weight)


def sampled_layers_of(param):
    """Every weight-sampled layer whose weight is `param` (an empty tuple if none)."""
    layers = _LAYERS.get(id(param))
    if not layers:
        return ()
    return tuple(m for m in layers if m.weight is param)


def sampled_layer_of(param):
    """A weight-sampled layer whose weight is `param`, or None (one of them where
    several share it: use sampled_layers_of for all)."""
    layers = sampled_layers_of(param)
    return layers[0] if layers else None
