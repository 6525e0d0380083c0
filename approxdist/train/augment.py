"""Training-time augmentation of `approxdist-train`, with torchvision's flags and meanings:
`--auto-augment` (ta_wide, ra, augmix, or an AutoAugment policy: imagenet, cifar10, svhn),
`--random-erase` (the probability of RandomErasing), and `--mixup-alpha`/`--cutmix-alpha`
(MixUp and CutMix on each training batch, one of them drawn per batch when both are set,
as torchvision's references/classification do; the targets become class probabilities).

The image transforms act on 8-bit images (ImageFolder's PIL images, CIFAR-10's uint8
tensors), as AutoAugment's magnitudes assume; digits and fake data are float tensors, so
--auto-augment is refused there while --random-erase (a rectangle of zeros, the mean after
normalisation) applies to every data set. Mixing happens in the training loop on the batch,
drawing from the global RNG, whose state the checkpoint holds.
"""
from torch.utils.data import Dataset

AUTO_AUGMENT = ("ta_wide", "ra", "augmix", "imagenet", "cifar10", "svhn")
IMAGE_DATASETS = ("imagefolder", "cifar10")  # 8-bit images: where --auto-augment applies


def auto_augment(name, *, ra_magnitude=9, augmix_severity=3):
    """torchvision's transform for --auto-augment `name` (None: none)."""
    if name is None:
        return None
    from torchvision import transforms as T

    if name == "ta_wide":
        return T.TrivialAugmentWide()
    if name == "ra":
        return T.RandAugment(magnitude=ra_magnitude)
    if name == "augmix":
        return T.AugMix(severity=augmix_severity)
    if name in ("imagenet", "cifar10", "svhn"):
        return T.AutoAugment(T.AutoAugmentPolicy(name))
    raise ValueError(f"--auto-augment must be one of {', '.join(AUTO_AUGMENT)}, got {name!r}")


def random_erasing(p):
    if not p:
        return None
    from torchvision import transforms as T

    return T.RandomErasing(p=p)


class Erasing(Dataset):
    """A tensor data set whose images get RandomErasing (training sets of digits, fake)."""

    def __init__(self, base, p):
        self.base, self.erase = base, random_erasing(p)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.erase(x), y


def batch_mixer(mixup_alpha, cutmix_alpha, num_classes):
    """fn(images, target) -> (images, soft target), or None when both alphas are 0."""
    from torchvision.transforms import v2

    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


__all__ = ["AUTO_AUGMENT", "IMAGE_DATASETS", "auto_augment", "random_erasing", "Erasing", "batch_mixer"]
