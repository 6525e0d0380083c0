"""Models for `approxdist-train`: any torchvision classification model by name, plus two
small built-ins that train in seconds on CPU (the tests and the demo use them).

The built-ins use plain nn.Conv2d / nn.Linear so `approxdist.convert_model` swaps them like
any user model, and carry no BatchNorm or dropout: nothing in them draws from the global
RNG or keeps running statistics, so a resumed run is bit-identical to an uninterrupted one.
"""
import torch
from torch import nn

BUILTIN = ("cnn", "mlp")


class SmallCNN(nn.Module):
    """Three 3x3 convolutions and a linear head; sized for 8x8 digits and 32x32 images."""

    def __init__(self, in_channels=1, num_classes=10, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),  # keeps where a stroke is, which is most of a digit
        )
        self.classifier = nn.Linear(2 * width * 16, num_classes)
        # He initialisation, as torchvision's ResNets: with torch's default init this ReLU
        # stack starts with vanishing activations and stalls for the first epochs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    def __init__(self, in_features, num_classes=10, hidden=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


def torchvision_models():
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name):
    if name in BUILTIN:
        return
    known = torchvision_models()
    if name not in known:
        raise ValueError(
            f"--model {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor a torchvision "
            f"classification model (e.g. resnet18, resnet50, vgg16, mobilenet_v3_small)"
        )


def build_model(name, *, num_classes, in_channels=3, image_size=32, width=None):
    """Build an untrained model; torchvision weights are never fetched (no network).
    width: the built-ins' size (SmallCNN's width, MLP's hidden units; None: their default)."""
    check_model_name(name)
    if width is not None and (name not in BUILTIN or width < 1):
        raise ValueError(f"width: a positive size for the built-in models ({', '.join(BUILTIN)}), "
                         f"got {width!r} for {name!r}")
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, **({} if width is None else {"width": width}))
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes,
                   **({} if width is None else {"hidden": width}))
    import torchvision

    if in_channels != 3:
        raise ValueError(f"--model {name!r} expects 3-channel images; this dataset has {in_channels}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)




def read_weights(path):
    """The model state_dict in a local --weights file: a saved `model.state_dict()` or an
    approxdist-train checkpoint (its "model"). Read with weights_only=True; ValueError
    naming the file when it holds neither."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign or truncated file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--weights {path!r} is not a weights-only state_dict file: {first}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"--weights {path!r} holds no state_dict (a dict of tensors)")
    return data


def uses_sampled_layers(args) -> bool:
    """The exact dense baseline keeps torch's own layers; every other run gets the sampled
    distributed forms, which also tell the sparse hook which slices are non-zero."""
    from .comm import SPARSE_HOOKS

    return args.sample_ratio < 1.0 or args.budget is not None or args.comm_hook in SPARSE_HOOKS


def build_plain_model(args, info):
    """The architecture `args` name, with torch's own layers (what --model-ema averages into)."""
    model = build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, width=getattr(args, "width", None))
    if getattr(args, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_training_model(args, info):
    """Same seed on every rank, so the ranks start equal even before DDP's broadcast.

    --channels-last and --sync-bn act on torch's layers before the conversion, which then
    lays the sampled weights out as --weight-layout says (channels_last would undo that)."""
    torch.manual_seed(args.seed)
    model = build_plain_model(args, info)
    if getattr(args, "sync_bn", False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if uses_sampled_layers(args):
        import approxdist

        # Horovod's broadcast and all-reduce need contiguous weights.
        layout = getattr(args, "weight_layout", None)
        if layout is None:
            layout = "contiguous" if getattr(args, "dist", "torch") == "horovod" else "input_major"
        model = approxdist.convert_model(
            model, None if args.budget is not None else args.sample_ratio, args.minimal_k, budget=args.budget,
            distributed=True, policy=args.policy, mode=getattr(args, "sample_mode", "weight_grad"), seed=args.seed,
            weight_layout=layout, explore=args.explore,
            norm_stats=args.norm_stats, norm_stats_every=args.norm_stats_every,
            allow_unbiased=getattr(args, "allow_unbiased_sampling", False))
    return model


__all__ = ["BUILTIN", "SmallCNN", "MLP", "build_model", "check_model_name", "torchvision_models",
           "uses_sampled_layers", "build_plain_model", "build_training_model", "read_weights"]
