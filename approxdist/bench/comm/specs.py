"""The benchmark's options as typed specifications: a hook name, one (model, hook) run,
a plan of runs, a time-to-accuracy plan.

A plan travels to the ranks as JSON and is saved in the result file, so each spec reads
from and writes to the same plain dicts the JSON files have always held (`from_dict`,
`to_dict`); the dataclasses are what the code passes around, so a misspelt option is an
AttributeError, not a silent default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Optional

__all__ = ["HookSpec", "parse_hook", "RunConfig", "Plan", "TtaPlan", "DEFAULT_BUCKET_MB"]

DEFAULT_BUCKET_MB = 25


@dataclass(frozen=True)
class HookSpec:
    """What a hook name asks for.

    kind: "allreduce", "fp16", "powersgd" or "sparse"; ratio: the sparse hook's sample
    ratio (1 for the others); fp16: the payload travels in 16 bits; rank: PowerSGD's
    matrix rank; loop: "usual" (step after backward), "step" (the optimizer steps inside
    the hook) or "overlap" (the next forward overlaps the transfer and steps each bucket);
    eager_fraction: +overlapF's F, None where the name gives none; mode: the sampled
    layers' mode ("sparseX-forward": 'forward', else convert_model's distributed default,
    'weight_grad')."""

    name: str
    kind: str
    ratio: float = 1.0
    fp16: bool = False
    rank: Optional[int] = None
    loop: str = "usual"
    eager_fraction: Optional[float] = None
    mode: str = "weight_grad"

    @property
    def step_in_hook(self) -> bool:
        return self.loop != "usual"

    @property
    def overlap(self) -> bool:
        return self.loop == "overlap"


def parse_hook(name: str) -> HookSpec:
    """"allreduce", "fp16", "powersgdR", "sparseX" or "sparseX+fp16", each optionally with
    "+step" (the optimizer steps inside the hook, bucket by bucket) or "+overlap" (the
    next forward overlaps the transfer and steps each bucket; "+overlapF": with eager
    fraction F, else --eager-fraction's) -> its HookSpec."""
    m = re.search(r"\+(step|overlap)(\d*\.?\d+)?$", name)
    loop = m.group(1) if m else "usual"
    base = name[:m.start()] if m else name
    kind, ratio, fp16, rank, mode = _parse_base_hook(base, name)
    fraction = float(m.group(2)) if m and m.group(2) else None
    if fraction is not None and (loop != "overlap" or not 0 < fraction <= 1):
        raise ValueError(f"hook: an eager fraction F in (0, 1] follows +overlap only, got {name!r}")
    return HookSpec(name=name, kind=kind, ratio=ratio, fp16=fp16, rank=rank, loop=loop,
                    eager_fraction=fraction, mode=mode)


def _parse_base_hook(name: str, full: str):
    if name in ("allreduce", "fp16"):
        return name, 1.0, name == "fp16", None, "weight_grad"
    m = re.fullmatch(r"powersgd(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return "powersgd", 1.0, False, int(m.group(1)), "weight_grad"
    m = re.fullmatch(r"sparse(\d*\.?\d+)(-forward)?(\+fp16)?", name)
    if m and 0.0 < float(m.group(1)) <= 1.0:
        return "sparse", float(m.group(1)), bool(m.group(3)), None, "forward" if m.group(2) else "weight_grad"
    raise ValueError(f"hook must be allreduce, fp16, powersgdR, sparseX or sparseX+fp16 "
                     f"(0 < X <= 1; sparseX-forward: the sampled forward), each optionally followed by "
                     f"+step, +overlap or +overlapF, got {full!r}")


@dataclass
class RunConfig:
    """One (model, hook) of a plan. bucket_mb: DDP's bucket_cap_mb (PowerSGD always runs in
    one bucket); eager_fraction: the +overlap share the command line settled on (a plan
    written by hand may leave it to the hook's +overlapF); seed: pins this run's seed.
    extra: other keys of a hand-written config, copied into its result rows."""

    model: str
    hook: str
    bucket_mb: Optional[float] = None
    eager_fraction: Optional[float] = None
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> HookSpec:
        return parse_hook(self.hook)

    @classmethod
    def from_dict(cls, d) -> "RunConfig":
        if isinstance(d, cls):
            return d
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {"model": self.model, "hook": self.hook}
        for key in ("bucket_mb", "eager_fraction", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out


@dataclass
class Plan:
    """Every (model, hook) run, interleaved `repeats` times: `steps` timed DDP steps after
    `warmup` untimed ones, on random `image_size` px images, `batch` per rank; compute alone
    (DDP's sync off) `compute_steps` times in the first `compute_repeats` rounds."""

    configs: list
    batch: int
    image_size: int
    steps: int
    warmup: int
    repeats: int
    seed: int = 0
    compute_steps: int = 2
    compute_repeats: int = 1
    verbose: bool = False
    threads: Optional[int] = None  # torch threads per rank (None: 1)

    def __post_init__(self):
        self.configs = [RunConfig.from_dict(c) for c in self.configs]

    @classmethod
    def from_dict(cls, d) -> "Plan":
        if isinstance(d, cls):
            return d
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        out = {"configs": [c.to_dict() for c in self.configs], "batch": self.batch,
               "image_size": self.image_size, "steps": self.steps, "warmup": self.warmup,
               "repeats": self.repeats, "seed": self.seed, "compute_steps": self.compute_steps,
               "compute_repeats": self.compute_repeats, "verbose": self.verbose}
        if self.threads is not None:
            out["threads"] = self.threads
        return out


@dataclass
class TtaPlan:
    """A time-to-accuracy run: approxdist-train --model `model` (--width `width`) on digits
    (--image-size `image_size`, --lr `lr`, --bucket-cap-mb `bucket_mb` where given) for `epochs` epochs at `batch` per rank, 2 testbed nodes at `rate`, evaluating every
    `eval_every` steps, `repeats` interleaved rounds; `target` the test top-1 % to reach."""

    model: str
    epochs: int
    batch: int
    rate: str
    eval_every: int
    repeats: int
    target: float
    width: Optional[int] = None
    image_size: Optional[int] = None  # digits upscaled to this size in 3 channels (a torchvision model)
    lr: Optional[float] = None  # approxdist-train's --lr (None: its default, 0.1)
    bucket_mb: Optional[float] = None  # approxdist-train's --bucket-cap-mb (None: its default, DDP's 25)

    @classmethod
    def from_dict(cls, d: dict) -> "TtaPlan":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"model": self.model, "width": self.width, "epochs": self.epochs, "batch": self.batch,
                "rate": self.rate, "eval_every": self.eval_every, "repeats": self.repeats,
                "target": self.target, "image_size": self.image_size, "lr": self.lr,
                "bucket_mb": self.bucket_mb}
