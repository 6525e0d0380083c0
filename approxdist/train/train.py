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

import torch.distributed as dist

from ..distributed import (
    collective_timeout,
    init_distributed,
    naming_unresponsive_ranks,
    shutdown_distributed,
)
from . import checkpoint as ckpt
from .args import validate
from .data import build_datasets
from .loop import Placement, evaluate, train_one_epoch
from .models import build_training_model, uses_sampled_layers
from .trainer import STRICT_CONFIG, Trainer, check_resume_config, restart_count, run_config

__all__ = ["main", "train_one_epoch", "evaluate", "build_training_model", "uses_sampled_layers", "Trainer",
           "resolve_resume", "refuse_to_overwrite", "STRICT_CONFIG"]


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


def main(args, *, callbacks=()):
    """Train as ``args`` says; returns the last epoch's metrics (on every rank).
    callbacks: each `fn(trainer, step)` after every optimizer step (see `Trainer`)."""
    validate(args)
    # Everything that can fail on a bad flag happens before the process group exists.
    datasets = build_datasets(args.dataset, args.data_path, args.image_size)
    info = datasets[2]
    model = build_training_model(args, info)
    resume = resolve_resume(args)
    refuse_to_overwrite(args, resume)
    resume_data = None
    if resume:  # a corrupt or foreign checkpoint is also a one-line error before the group exists
        resume_data = ckpt.read(resume)
        check_resume_config(resume_data["config"], run_config(args, info.num_classes), resume,
                            allow_changes=args.allow_config_change)
        ckpt.validate_model_state(resume_data["model"], model, resume)
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
            trainer = Trainer.build(args, model, datasets, place, callbacks)
            metrics = trainer.fit((resume, resume_data))
        finished = True
        return metrics
    finally:
        if dist.is_available() and dist.is_initialized():
            shutdown_distributed(wait=finished)
