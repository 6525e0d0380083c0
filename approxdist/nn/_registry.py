"""Which parameters belong to weight-sampled layers.

The comm hook receives bare gradient buckets; this weak map lets it find the layer of a
weight (and so its selected channels) without holding the model or keying on bucket
positions, which DDP changes when it rebuilds buckets after the first iteration."""
import weakref

import torch

_LAYERS = weakref.WeakValueDictionary()


def register_sampled(layer):
    _LAYERS[id(layer.weight)] = layer
    layer._registered_id = id(layer.weight)


def is_registered(layer):
    """sampled_layer_of(layer.weight) is layer. Under torch.compile, which cannot trace a
    weakref call (a graph break per layer), it compares the weight's id with the one the
    layer was registered under: a copy or an unpickled layer carries the original's."""
    if torch.compiler.is_compiling():
        return getattr(layer, "_registered_id", None) == id(layer.weight)
    return sampled_layer_of(layer.weight) is layer


def sampled_layer_of(param):
    """The weight-sampled layer whose weight is `param`, or None."""
    layer = _LAYERS.get(id(param))
    if layer is not None and layer.weight is param:
        return layer
    return None
