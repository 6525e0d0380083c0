"""Autocast support for the custom autograd Functions.

Autocast does not reach inside a custom Function's forward, so the ops cast their
operands to the autocast dtype first (like `torch.amp.custom_fwd(cast_inputs=...)`),
outside the Function, so the weight's gradient flows back in the weight's own dtype."""
import contextlib

import torch


def autocast_dtype(device_type):
    """The autocast dtype active for device_type, or None when autocast is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4 spells these per device
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return None


def cast_for_autocast(tensors, device_type):
    """Cast floating tensors to the autocast dtype; returns (tensors, context) where the
    context disables autocast around the Function."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors, contextlib.nullcontext()
    cast = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
    return cast, torch.autocast(device_type, enabled=False)
