"""`approxdist-train`: data-parallel image classification with approximate layers.

In the manner of torchvision's references/classification: `main(args)` wires things up,
`train_one_epoch` and `evaluate` (loop.py) do the work, and the `Trainer` (trainer.py)
holds the run's objects and its loop. The approximate layers come from
`approxdist.convert_model`, the sparse hook from `approxdist.distributed.register`; the
launcher (torchrun, srun, mpirun or none) is `approxdist.distributed.init_distributed`'s
business.

Determinism is a feature here: the data order is a function of (seed, epoch), the
learning-rate schedule a function of the step, the sampled layers draw from their own
generators, and all of it is in the checkpoint, so a resumed or elastically restarted run
ends with the same parameters as one that never stopped.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from ..distributed import (
    collective_timeout,
    init_distributed,
    naming_unresponsive_ranks,
    shutdown_distributed,
)
from . import checkpoint as ckpt
from .args import validate
from .data import Augment, build_datasets, build_loaders
from .loop import Placement, evaluate, train_one_epoch
from .models import build_plain_model, build_training_model, read_weights, uses_sampled_layers
from .trainer import STRICT_CONFIG, Trainer, check_resume_config, restart_count, run_config

__all__ = ["main", "train_one_epoch", "evaluate", "build_training_model", "uses_sampled_layers", "Trainer",
           "resolve_resume", "refuse_to_overwrite", "load_weights", "test_only", "STRICT_CONFIG"]


def resolve_resume(args):
    """``--resume auto``, or any torchrun restart, continues from OUTPUT_DIR's checkpoint."""
    if args.resume == "auto" or (args.resume is None and restart_count() > 0 and args.output_dir):
        path = os.path.join(args.output_dir, ckpt.LATEST)
        return path if os.path.isfile(path) else None
    return args.resume


def refuse_to_overwrite(args, resume):
    """A fresh start into a folder that holds a run would replace its checkpoint and mix two
    runs in its metrics: refused unless --overwrite. A torchrun restart (which resumes when
    there is a checkpoint) and --resume auto without a checkpoint yet are the same run."""
    if resume is not None or args.overwrite or args.resume == "auto" or restart_count() > 0:
        return
    found = ckpt.existing_run(args.output_dir)
    if found:
        raise ValueError(f"--output-dir {args.output_dir!r} already holds a run ({', '.join(found)}): continue it "
                         "with --resume auto, start the new run in a fresh --output-dir, or replace the old one "
                         "with --overwrite")


def load_weights(model, path):
    """--weights: start from a local state_dict (validated in full first: a file of another
    model is an error naming it, before any process group)."""
    state = read_weights(path)
    ckpt.validate_model_state(state, model, path)
    model.load_state_dict(state, strict=True)


def _device(place):
    if torch.cuda.is_available():
        device = torch.device("cuda", place.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def test_only(args, model, datasets, place, resume_data=None):
    """--test-only: evaluate the loaded weights (and the checkpoint's EMA, if it has one) on
    the validation set, sharded over the ranks, print one line on rank 0; nothing is written."""
    device = _device(place)
    _, val_loader, _ = build_loaders(datasets[0], datasets[1], rank=place.rank, world_size=place.world_size,
                                     batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    kw = dict(amp=args.amp, horovod=place.horovod, channels_last=args.channels_last)
    metrics = evaluate(model.to(device), val_loader, device, **kw)
    ema_state = (resume_data or {}).get("model_ema") or {}
    if ema_state:
        ema = build_plain_model(args, datasets[2])
        ema.load_state_dict(ema_state["module"], strict=True)
        metrics.update({f"ema_{k}": v for k, v in evaluate(ema.to(device), val_loader, device, **kw).items()
                        if k != "val_samples"})
    if place.rank == 0:
        line = (f"test-only: val_loss {metrics['val_loss']:.4f} top1 {metrics['top1']:.2f} "
                f"top5 {metrics['top5']:.2f} on {metrics['val_samples']} images")
        if ema_state:
            line += f"; EMA top1 {metrics['ema_top1']:.2f} top5 {metrics['ema_top5']:.2f}"
        print(line, flush=True)
    return metrics


def main(args, *, callbacks=()):
    """Train as ``args`` says; returns the last epoch's metrics (on every rank).
    callbacks: each `fn(trainer, step)` after every optimizer step (see `Trainer`)."""
    validate(args)
    # Everything that can fail on a bad flag happens before the process group exists.
    datasets = build_datasets(args.dataset, args.data_path, args.image_size, Augment.from_args(args))
    info = datasets[2]
    model = build_training_model(args, info)
    if args.weights:  # a resumed checkpoint, if any, replaces them below
        load_weights(model, args.weights)
    resume = resolve_resume(args)
    if args.test_only and args.weights is None and resume is None:
        raise ValueError(f"--test-only --resume auto: {args.output_dir!r} holds no checkpoint")
    if not args.test_only:
        refuse_to_overwrite(args, resume)
    resume_data = None
    if resume:  # a corrupt or foreign checkpoint is also a one-line error before the group exists
        resume_data = ckpt.read(resume)
        if not args.test_only:
            check_resume_config(resume_data["config"], run_config(args, info.num_classes), resume,
                                allow_changes=args.allow_config_change)
        ckpt.validate_model_state(resume_data["model"], model, resume)
        if args.test_only:
            model.load_state_dict(resume_data["model"], strict=True)
    horovod = args.dist == "horovod"
    if horovod:
        from .hvd import init

        rank, world_size, local_rank = init()
    else:
        rank, world_size, local_rank = init_distributed(args.backend, timeout=args.timeout)
    place = Placement(rank, world_size, local_rank, horovod)
    finished = False
    # A rank that stops answering fails the others' collectives after --timeout; the
    # error then names it (not under Horovod, which has its own stall reports).
    watch = (contextlib.nullcontext() if horovod
             else naming_unresponsive_ranks(rank, world_size, collective_timeout(args.timeout)))
    try:
        with watch:
            if args.test_only:
                metrics = test_only(args, model, datasets, place, resume_data)
            else:
                trainer = Trainer.build(args, model, datasets, place, callbacks)
                metrics = trainer.fit((resume, resume_data))
        finished = True
        return metrics
    finally:
        if dist.is_available() and dist.is_initialized():
            shutdown_distributed(wait=finished)
