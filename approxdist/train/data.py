"""Datasets and loaders for `approxdist-train`.

Four sources: an ImageFolder tree (ImageNet layout), the CIFAR-10 python batches, sklearn's
bundled handwritten digits and generated tensors. None of them downloads anything: the
digits ship inside scikit-learn and the fake data is made from a seeded generator, so the
tests and the demo run on a machine without network.

The training sampler can skip the first batches of an epoch, which is what lets a run
resumed from a mid-epoch checkpoint see exactly the batches the uninterrupted run saw.
"""
import os
import pickle
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .augment import IMAGE_DATASETS, Erasing, auto_augment, random_erasing

DATASETS = ("imagefolder", "cifar10", "digits", "fake")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int


@dataclass
class Augment:
    """How the training images are augmented and the ImageFolder images sized (torchvision's
    flags; None sizes follow --image-size, else 224 and 224/0.875 = 256)."""

    train_crop_size: int = None
    val_resize_size: int = None
    val_crop_size: int = None
    auto_augment: str = None
    random_erase: float = 0.0
    extra: dict = field(default_factory=dict)  # ra_magnitude, augmix_severity

    @classmethod
    def from_args(cls, args):
        return cls(args.train_crop_size, args.val_resize_size, args.val_crop_size, args.auto_augment,
                   args.random_erase, {"ra_magnitude": args.ra_magnitude, "augmix_severity": args.augmix_severity})


def detect_dataset(data_path):
    """The data set a --data-path holds when no --dataset is named: CIFAR-10's python batches
    or an ImageFolder root (train/, val/); anything else is an error naming both."""
    if _cifar_root(data_path) is not None:
        return "cifar10"
    if all(os.path.isdir(os.path.join(data_path, split)) for split in ("train", "val")):
        return "imagefolder"
    raise ValueError(f"--data-path {data_path!r} holds neither an ImageFolder tree (train/, val/) nor CIFAR-10 "
                     "python batches; fix the path or name the data set with --dataset")


def default_workers(dataset, local_processes=1):
    """--workers auto: none for the in-memory tensor sets (digits, fake: a worker would only
    copy), else min(8, CPUs per process) for the decoded and augmented ones (imagefolder,
    cifar10), so decoding never runs inside the training process."""
    if dataset in ("digits", "fake"):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(int(local_processes), 1)))


def check_data_path(dataset: str, data_path):
    """Fail before any process group exists when the data cannot be where it is said to be."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset in ("digits", "fake") and data_path:
        raise ValueError(f"--data-path is not read by --dataset {dataset} (generated or bundled data); drop it, "
                         "or name the data set it holds (imagefolder, cifar10)")
    if dataset == "imagefolder":
        if not data_path:
            raise ValueError("--data-path is required for --dataset imagefolder")
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(data_path, split)):
                raise ValueError(f"--data-path {data_path!r} has no {split}/ folder (ImageFolder layout expected)")
    elif dataset == "cifar10":
        if not data_path:
            raise ValueError("--data-path is required for --dataset cifar10")
        root = _cifar_root(data_path)
        if root is None:
            raise ValueError(
                f"--data-path {data_path!r} holds no CIFAR-10 python batches (data_batch_1..5, test_batch); "
                "this program never downloads"
            )


def _cifar_root(data_path):
    for candidate in (data_path, os.path.join(data_path, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(candidate, f"data_batch_{i}")) for i in range(1, 6)) and os.path.isfile(
            os.path.join(candidate, "test_batch")
        ):
            return candidate
    return None


# What the CIFAR-10 python batches hold: a dict of a uint8 numpy array, a list of ints and
# strings. The globals a pickle of that names (numpy's array reconstruction under its old and
# new module paths, and _codecs.encode for bytes in protocol-2 pickles) are all the
# unpickler may look up: anything else in a data folder is refused before it can run.
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise _Refused(f"it names {module}.{name}, which CIFAR-10 batches never hold")
        return super().find_class(module, name)


def _read_cifar_batch(path):
    """One batch file as (uint8 images [n, 3, 32, 32], int64 labels [n]), or ValueError
    naming the file and what is wrong with it (one line, no traceback)."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise ValueError(f"--data-path: {path} is not a CIFAR-10 batch, refused to unpickle it: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as exc:
        raise ValueError(f"--data-path: {path} is corrupt or truncated ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"--data-path: {path} is not a CIFAR-10 batch (a dict with 'data' and 'labels' expected)")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"--data-path: {path}: 'data' must be a uint8 array of shape (n, 3072), got {shape}")
    if (not isinstance(labels, (list, np.ndarray)) or len(labels) != data.shape[0]
            or not all(isinstance(y, (int, np.integer)) and 0 <= y < 10 for y in labels)):
        raise ValueError(f"--data-path: {path}: 'labels' must be {data.shape[0]} integers in [0, 10)")
    return torch.as_tensor(data).reshape(-1, 3, 32, 32), torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _load_cifar_batches(root, names):
    xs, ys = zip(*(_read_cifar_batch(os.path.join(root, name)) for name in names))
    return torch.cat(xs), torch.cat(ys)


class _CifarTensors(Dataset):
    """CIFAR-10 held as uint8 tensors; training adds the usual crop-and-flip augmentation."""

    def __init__(self, images, labels, train, augment=None):
        self.images, self.labels, self.train = images, labels, train
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)
        augment = augment or Augment()
        self.policy = auto_augment(augment.auto_augment, **augment.extra) if train else None
        self.erase = random_erasing(augment.random_erase) if train else None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.policy is not None:  # on the 8-bit image, as torchvision's presets
            x = self.policy(x)
        x = x.float().div_(255)
        if self.train:
            x = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x, self.labels[i]


def _digits(image_size=None, seed_split=0):
    """sklearn's 8x8 digits (1797 images) split 80/20 with a fixed permutation, so every
    run and every rank sees the same split whatever --seed is.

    With an image_size other than 8 the images are upscaled (bilinear) to that size and
    repeated over 3 channels: a task that torchvision models with BatchNorm (resnet18 at
    32 px) train on in minutes on a CPU."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    x = (x - 0.3) / 0.4  # roughly zero mean, unit variance over the whole set
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed_split))
    n_train = int(0.8 * len(y))
    tr, va = perm[:n_train], perm[n_train:]
    if image_size is None or image_size == 8:
        return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), DataInfo(10, 1, 8)
    x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), DataInfo(10, 3, image_size)


def _fake(image_size, num_classes=10, n_train=512, n_val=128):
    """Noise plus a fixed per-class template, so the task is learnable and accuracy moves;
    drawn from a fixed generator, hence identical on every rank and every run."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.randn(num_classes, 3, image_size, image_size, generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.randn(n, 3, image_size, image_size, generator=g) + 0.05 * templates[y]
        return TensorDataset(x, y)

    return make(n_train), make(n_val), DataInfo(num_classes, 3, image_size)


def _imagefolder(data_path, image_size, augment):
    """torchvision's classification presets: RandomResizedCrop(train crop), flip, the
    --auto-augment policy, normalise, RandomErasing; Resize(val resize), CenterCrop(val crop)."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    crop = augment.train_crop_size or image_size
    val_crop = augment.val_crop_size or image_size
    resize = augment.val_resize_size or int(round(val_crop / 0.875))
    steps = [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()]
    policy = auto_augment(augment.auto_augment, **augment.extra)
    steps += [policy] if policy is not None else []
    steps += [transforms.ToTensor(), normalize]
    erase = random_erasing(augment.random_erase)
    steps += [erase] if erase is not None else []
    train_tf = transforms.Compose(steps)
    val_tf = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(val_crop), transforms.ToTensor(), normalize]
    )
    image_size = crop
    splits = []
    for split, tf in (("train", train_tf), ("val", val_tf)):
        folder = os.path.join(data_path, split)
        try:  # torchvision raises FileNotFoundError for a folder without classes or images
            splits.append(datasets.ImageFolder(folder, tf))
        except (FileNotFoundError, RuntimeError) as exc:
            raise ValueError(f"--data-path: {folder} holds no usable ImageFolder data "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    train, val = splits
    if train.classes != val.classes:  # else the val labels would index other classes
        raise ValueError(f"--data-path: {data_path} has {len(train.classes)} classes in train/ and "
                         f"{len(val.classes)} in val/, not the same ones")
    return train, val, DataInfo(len(train.classes), 3, image_size)


def build_datasets(dataset, data_path=None, image_size=None, augment=None):
    """Return ``(train_set, val_set, DataInfo)``; augment: an `Augment` (None: none)."""
    check_data_path(dataset, data_path)
    augment = augment or Augment()
    if augment.auto_augment is not None and dataset not in IMAGE_DATASETS:
        raise ValueError(f"--auto-augment transforms 8-bit images ({', '.join(IMAGE_DATASETS)}), "
                         f"not --dataset {dataset}")
    if dataset in ("digits", "fake"):
        train, val, info = _digits(image_size) if dataset == "digits" else _fake(image_size or 32)
        return (Erasing(train, augment.random_erase) if augment.random_erase else train), val, info
    if dataset == "cifar10":
        root = _cifar_root(data_path)
        xtr, ytr = _load_cifar_batches(root, [f"data_batch_{i}" for i in range(1, 6)])
        xva, yva = _load_cifar_batches(root, ["test_batch"])
        return _CifarTensors(xtr, ytr, True, augment), _CifarTensors(xva, yva, False), DataInfo(10, 3, 32)
    return _imagefolder(data_path, image_size or 224, augment)


class ResumableDistributedSampler(Sampler):
    """DistributedSampler's epoch-seeded shuffle with drop-last shards, plus a start offset.

    ``set_epoch(epoch, start_batch)`` makes the next iteration begin at batch
    ``start_batch`` of that epoch's order, so a mid-epoch resume replays nothing and skips
    nothing. Every rank gets the same number of batches (the tail that does not fill a
    batch on every rank is dropped), which keeps DDP's collectives in lock step.

    Batch b of every rank together is the slice ``[b*W*B, (b+1)*W*B)`` of the epoch's
    order (W ranks, B per rank), so the first s steps consume exactly the first s*W*B
    samples whatever W and B are. That is what lets a run resized mid-epoch go on:
    ``set_epoch(epoch, start_batch, start_sample=n)`` shards the order from sample n on
    over this run's ranks, and `consumed` says how far the epoch has got, in samples.
    """

    def __init__(self, n, num_replicas, rank, batch_size, seed=0, shuffle=True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.global_batch = num_replicas * batch_size
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"--batch-size {batch_size} x {num_replicas} processes exceeds the {n} training samples"
            )
        self.epoch, self.start_batch, self.start_sample = 0, 0, 0

    def set_epoch(self, epoch, start_batch=0, *, start_sample=None):
        """start_sample: the samples of the epoch's order already consumed (default
        start_batch global batches); the epoch then has batches_per_epoch - start_batch
        batches left, which must fit in what remains of the order."""
        if start_sample is None:
            start_sample = start_batch * self.global_batch
        if start_sample + (self.batches_per_epoch - start_batch) * self.global_batch > self.n:
            raise ValueError(f"{self.batches_per_epoch - start_batch} batches of {self.global_batch} do not fit "
                             f"after sample {start_sample} of {self.n}")
        self.epoch, self.start_batch, self.start_sample = epoch, start_batch, start_sample

    def consumed(self, step_in_epoch):
        """Samples of this epoch's order used once `step_in_epoch` steps of it are done."""
        return self.start_sample + (step_in_epoch - self.start_batch) * self.global_batch

    def _order(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g)
        return torch.arange(self.n)

    def __iter__(self):
        left = (self.batches_per_epoch - self.start_batch) * self.global_batch
        rest = self._order()[self.start_sample : self.start_sample + left]
        return iter(rest[self.rank :: self.num_replicas].tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def build_loaders(train_set, val_set, *, rank, world_size, batch_size, workers, seed):
    """Training loader with the resumable sampler; validation sharded rank::world without
    padding, so summing the per-rank counts gives the exact accuracy on the whole set."""
    sampler = ResumableDistributedSampler(len(train_set), world_size, rank, batch_size, seed=seed)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    val_indices = list(range(rank, len(val_set), world_size))
    val_loader = DataLoader(torch.utils.data.Subset(val_set, val_indices), batch_size=batch_size, **common)
    return train_loader, val_loader, sampler


def steps_per_epoch(n_train, world_size, batch_size):
    return max(n_train // (world_size * batch_size), 0)


__all__ = [
    "DATASETS",
    "DataInfo",
    "Augment",
    "detect_dataset",
    "default_workers",
    "build_datasets",
    "build_loaders",
    "check_data_path",
    "ResumableDistributedSampler",
    "steps_per_epoch",
]
