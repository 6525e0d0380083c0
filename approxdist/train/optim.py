"""The optimizer of `approxdist-train`: torchvision's `--opt` choices, with its parameter
groups for `--norm-weight-decay`.

As torchvision's references/classification: `sgd` and `sgd_nesterov` take --momentum,
`rmsprop` takes --momentum with eps 0.0316 and alpha 0.9 (its EfficientNet/MobileNet
recipes), `adamw` takes neither. With --norm-weight-decay the parameters of normalisation
layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, LocalResponseNorm) form a second
group with that decay, and the rest keep --weight-decay: decaying a BatchNorm scale towards
zero fights the normalisation it serves.
"""
import torch
from torch import nn

OPTIMIZERS = ("sgd", "sgd_nesterov", "rmsprop", "adamw")
NORM_CLASSES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def parameter_groups(model, weight_decay, norm_weight_decay=None):
    """[{params, weight_decay}]: one group, or the norm layers' parameters apart (second)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if norm_weight_decay is None:
        return [{"params": params, "weight_decay": weight_decay}]
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_CLASSES)
                for p in m.parameters(recurse=False)}
    other = [p for p in params if id(p) not in norm_ids]
    norm = [p for p in params if id(p) in norm_ids]
    return [g for g in ({"params": other, "weight_decay": weight_decay},
                        {"params": norm, "weight_decay": norm_weight_decay}) if g["params"]]


def build_optimizer(model, args):
    """The optimizer `args.opt` names, over `parameter_groups` of `model`."""
    groups = parameter_groups(model, args.weight_decay, args.norm_weight_decay)
    name = args.opt
    if name in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=name == "sgd_nesterov")
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=args.lr, momentum=args.momentum, eps=0.0316, alpha=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ValueError(f"--opt must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


__all__ = ["OPTIMIZERS", "NORM_CLASSES", "parameter_groups", "build_optimizer"]
