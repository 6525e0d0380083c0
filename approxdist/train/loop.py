"""The work of one epoch and of one evaluation, as torchvision's references/classification
has them (`train_one_epoch`, `evaluate`), and where this process sits in the job.

Functions over what they are given, no module state: the `Trainer` calls them with its
objects, a test can call them with its own.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["Placement", "Recipe", "NonFiniteLoss", "sum_across_ranks", "train_one_epoch", "evaluate"]


class NonFiniteLoss(RuntimeError):
    """The training loss became nan or inf: the run stops (exit status 1) before anything
    of it is saved, so the last checkpoint is the last finite state."""


@dataclass(frozen=True)
class Placement:
    """This process in the job: its ranks, and whether Horovod, not torch.distributed,
    reduces (no process group then, and no DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    horovod: bool = False


@dataclass(frozen=True)
class Recipe:
    """What a training step does besides forward, backward and step (torchvision's flags):
    label smoothing, a batch mixer (MixUp/CutMix: soft targets), gradient clipping to a
    total norm, channels_last inputs. The defaults are a plain step."""

    label_smoothing: float = 0.0
    mixer: Optional[Callable] = None
    clip_grad_norm: Optional[float] = None
    channels_last: bool = False
    seed: int = 0  # the mixer draws from the global RNG seeded with (seed, step): a function of the step


def _mix(recipe, images, target, step):
    """MixUp/CutMix draw from the global RNG (torchvision's transforms take no generator);
    seeding it per step, inside fork_rng, makes the mix of step s the same in a resumed run
    and on every rank, and leaves the global stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed * 1_000_003 + step)
        return recipe.mixer(images, target)


def to_device(images, device, channels_last=False):
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def sum_across_ranks(values, device, *, horovod=False):
    """`values` summed over every rank (float64), through Horovod or torch.distributed;
    as they are in a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if horovod:
        from .hvd import sum_across_ranks as hvd_sum

        t = hvd_sum(t)
    elif dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _topk_correct(logits, target, ks):
    maxk = min(max(ks), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum().item() for k in ks]


def _autocast(device, enabled):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _clip(optimizer, scaler, max_norm):
    """Clip the (all-reduced) gradients to `max_norm` in total, unscaled first under a
    GradScaler, as torchvision does; every rank holds the same gradients, so the same clip."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, *, device, amp=False, step=0, max_steps=0,
                    on_step=None, progress=None, recipe=Recipe()):
    """One pass over ``loader`` (which already starts where a resumed epoch left off).

    Returns the summed loss, the sample count, the global step reached, the wall time and
    whether ``max_steps`` stopped it early. ``on_step(step, loss)`` runs after every
    optimizer step (mid-epoch evaluations, checkpoints, EMA updates, callbacks).
    """
    model.train()
    loss_sum, samples, stopped = 0.0, 0, False
    start = time.perf_counter()
    for images, target in loader:
        images, target = to_device(images, device, recipe.channels_last), target.to(device, non_blocking=True)
        if recipe.mixer is not None:
            images, target = _mix(recipe, images, target, step)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(images), target, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad()  # set_to_none (torch >= 2.0 default); Horovod takes no argument
        if scaler is not None:
            scaler.scale(loss).backward()
            if recipe.clip_grad_norm is not None:
                _clip(optimizer, scaler, recipe.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if recipe.clip_grad_norm is not None:
                _clip(optimizer, None, recipe.clip_grad_norm)
            optimizer.step()
        scheduler.step()
        step += 1
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss is {value} at step {step}: training diverged (a lower --lr?); "
                                "stopped, nothing of this step was saved")
        loss_sum += value * images.size(0)
        samples += images.size(0)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, value)
        if max_steps and step >= max_steps:
            stopped = True
            break
    return {"loss_sum": loss_sum, "samples": samples, "step": step, "seconds": time.perf_counter() - start,
            "stopped": stopped}


@torch.no_grad()
def evaluate(model, loader, device, amp=False, *, horovod=False, channels_last=False):
    """Exact evaluation (sampled layers are exact in eval mode) over this rank's shard; the
    counts are summed over ranks, so the result is the accuracy on the whole set."""
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    for images, target in loader:
        images, target = to_device(images, device, channels_last), target.to(device)
        with _autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        c1, c5 = _topk_correct(logits, target, (1, 5))
        top1, top5, n = top1 + c1, top5 + c5, n + images.size(0)
    loss_sum, top1, top5, n = sum_across_ranks([loss_sum, top1, top5, n], device, horovod=horovod)
    n = max(n, 1.0)
    return {"val_loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_samples": int(n)}
