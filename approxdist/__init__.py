"""approxdist: approximate tensor operations for cheaper data-parallel training.

Column-row sampling (CRS) keeps k of the n column-row pairs of a product; for a
convolution, k of the input channels. When the channels are chosen from the weights
alone every DDP rank picks the same ones, and the gradient of every unsampled slice is
exactly zero, so all-reducing only the sampled slices is lossless.
"""
from . import functional, kernels, nn
from .nn import convert_model

__version__ = "0.1.0"


def __getattr__(name):
    # torch.distributed is imported only when the distributed part is asked for, so the
    # layers work in builds of torch without distributed support.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    if name == "horovod":
        import importlib

        return importlib.import_module(".distributed.horovod", __name__)
    raise AttributeError(f"module 'approxdist' has no attribute {name!r}")


__all__ = ["functional", "nn", "kernels", "distributed", "convert_model", "__version__"]
