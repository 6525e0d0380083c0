"""Small models for the tests, built identically on every rank from a seed."""
import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, classes=10, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 1)
        self.fc1 = nn.Linear(2 * width * 4, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=48, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_model(name, seed=0, **kw):
    torch.manual_seed(seed)
    if name == "cnn":
        return SmallCNN(**kw)
    if name == "mlp":
        return MLP(**kw)
    import torchvision

    torch.manual_seed(seed)
    if name == "vit_small":  # torchvision's class, small: 32 px images, 16 tokens of 32 features
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64, num_classes=kw.get("classes", 10))
    return getattr(torchvision.models, name)(num_classes=kw.get("classes", 10))


def make_optimizer(name, params):
    """The optimizers the in-hook step tests compare with the usual loop."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    if name == "sgd_foreach":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=True)
    raise ValueError(name)


def batch_for(name, rank, step, batch=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    if name == "cnn":
        x = torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype)
    elif name == "mlp":
        x = torch.randn(batch, 32, generator=g, dtype=dtype)
    else:
        x = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)
    classes = 5 if name == "mlp" else 10
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


def analytic_bytes(model, dense=lambda p: False):
    """Bytes one step of the sparse reduction must send, counted from the model alone:
    k of n input channels of each weight-sampled weight (k from the layer's own ratio and
    minimal_k), all of every other parameter (and all of any parameter `dense` names)."""
    from approxdist.functional import num_samples
    from approxdist.nn import sampled_layer_of

    total = 0
    for p in model.parameters():
        layer = sampled_layer_of(p)
        if layer is None or dense(p):
            total += p.numel() * p.element_size()
        else:
            n = p.shape[1]
            total += p.numel() // n * num_samples(n, layer.sample_ratio, layer.minimal_k) * p.element_size()
    return total
