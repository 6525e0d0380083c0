"""Which parameters belong to weight-sampled layers.

The comm hook receives bare gradient buckets; this weak map lets it find the layer of a
weight (and so its selected channels) without holding the model or keying on bucket
positions, which DDP changes when it rebuilds buckets after the first iteration."""
import weakref

_LAYERS = weakref.WeakValueDictionary()


def register_sampled(layer):
    _LAYERS[id(layer.weight)] = layer


def sampled_layer_of(param):
    """The weight-sampled layer whose weight is `param`, or None."""
    layer = _LAYERS.get(id(param))
    if layer is not None and layer.weight is param:
        return layer
    return None
