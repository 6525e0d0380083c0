"""`approxdist-train`: data-parallel image classification with approximate layers.

A flat script in the manner of torchvision's references/classification: `main(args)` wires
things up, `train_one_epoch` and `evaluate` do the work. The approximate layers come from
`approxdist.convert_model`, the sparse hook from `approxdist.distributed.register`; the
launcher (torchrun, srun, mpirun or none) is `approxdist.distributed.init_distributed`'s
business.

Determinism is a feature here: the data order is a function of (seed, epoch), the
learning-rate schedule a function of the step, the sampled layers draw from their own
generators, and all of it is in the checkpoint, so a resumed or elastically restarted run
ends with the same parameters as one that never stopped.
"""
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .args import validate
from .clock import TrainClock
from .comm import SPARSE_HOOKS, build_comm
from .data import build_datasets, build_loaders
from .logs import MetricsLogger
from ..distributed import finish_steps, in_hook_steps, shutdown_distributed

# Test hook for the elastic-restart test: "RANK:STEP" makes that rank SIGKILL itself after
# completing global step STEP, on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0).
FAIL_ENV = "APPROXDIST_TRAIN_FAIL_AT"
# Checkpoint fields that must match for a resume to make sense at all.
STRICT_CONFIG = ("model", "dataset", "num_classes")


def _distributed():
    return dist.is_available() and dist.is_initialized()


_HOROVOD = False  # set by main() under --dist horovod


def _sum_across_ranks(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _HOROVOD:
        from .hvd import sum_across_ranks

        t = sum_across_ranks(t)
    elif _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _restart_count():
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def uses_sampled_layers(args) -> bool:
    """The exact dense baseline keeps torch's own layers; every other run gets the sampled
    distributed forms, which also tell the sparse hook which slices are non-zero."""
    return args.sample_ratio < 1.0 or args.comm_hook in SPARSE_HOOKS


def build_training_model(args, info):
    """Same seed on every rank, so the ranks start equal even before DDP's broadcast."""
    from .models import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, width=getattr(args, "width", None))
    if uses_sampled_layers(args):
        import approxdist

        # Horovod's broadcast and all-reduce need contiguous weights.
        layout = getattr(args, "weight_layout", None)
        if layout is None:
            layout = "contiguous" if getattr(args, "dist", "torch") == "horovod" else "input_major"
        model = approxdist.convert_model(model, args.sample_ratio, args.minimal_k, distributed=True,
                                         policy=args.policy, seed=args.seed, weight_layout=layout)
    return model


def _topk_correct(logits, target, ks):
    maxk = min(max(ks), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum().item() for k in ks]


def _autocast(device, enabled):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, *, device, amp=False, step=0, max_steps=0,
                    on_step=None, progress=None):
    """One pass over ``loader`` (which already starts where a resumed epoch left off).

    Returns the summed loss, the sample count, the global step reached, the wall time and
    whether ``max_steps`` stopped it early. ``on_step(step)`` runs after every optimizer
    step (checkpoints, the restart test hook).
    """
    model.train()
    loss_sum, samples, stopped = 0.0, 0, False
    start = time.perf_counter()
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(images), target)
        optimizer.zero_grad()  # set_to_none (torch >= 2.0 default); Horovod takes no argument
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        step += 1
        loss_sum += loss.item() * images.size(0)
        samples += images.size(0)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_step is not None:
            on_step(step)
        if max_steps and step >= max_steps:
            stopped = True
            break
    return {"loss_sum": loss_sum, "samples": samples, "step": step, "seconds": time.perf_counter() - start,
            "stopped": stopped}


@torch.no_grad()
def evaluate(model, loader, device, amp=False):
    """Exact evaluation (sampled layers are exact in eval mode) over this rank's shard; the
    counts are summed over ranks, so the result is the accuracy on the whole set."""
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        with _autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        c1, c5 = _topk_correct(logits, target, (1, 5))
        top1, top5, n = top1 + c1, top5 + c5, n + images.size(0)
    loss_sum, top1, top5, n = _sum_across_ranks([loss_sum, top1, top5, n], device)
    n = max(n, 1.0)
    return {"val_loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_samples": int(n)}


def _sampler_state(model):
    import approxdist

    fn = getattr(getattr(approxdist, "nn", None), "sampler_state", None)
    return fn(model) if fn is not None else {}


def _load_sampler_state(model, state):
    import approxdist

    fn = getattr(getattr(approxdist, "nn", None), "load_sampler_state", None)
    if fn is not None and state:
        fn(model, state)


class Trainer:
    """The objects one run holds, and the checkpoint round trip over all of them."""

    def __init__(self, args, model, ddp, optimizer, scheduler, scaler, comm, config, rank):
        self.args, self.model, self.ddp = args, model, ddp
        self.optimizer, self.scheduler, self.scaler, self.comm = optimizer, scheduler, scaler, comm
        self.config, self.rank = config, rank
        self.clock = TrainClock()

    def checkpoint_payload(self, epoch, step, step_in_epoch):
        uses_layers = uses_sampled_layers(self.args)
        return {
            "format": ckpt.FORMAT,
            "config": self.config,
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "comm": self.comm.state_dict(),
            "sampler_state": _sampler_state(self.model) if uses_layers else {},
            "rng": {"torch": torch.get_rng_state()},
            "train_seconds": self.clock.seconds,
        }

    def save(self, epoch, step, step_in_epoch):
        if self.rank != 0 or not self.args.output_dir:
            return
        path = os.path.join(self.args.output_dir, ckpt.LATEST)
        with self.clock.paused():
            ckpt.save_atomic(self.checkpoint_payload(epoch, step, step_in_epoch), path)

    def load(self, data, path):
        """Validate everything, then load everything: a bad file changes nothing."""
        if isinstance(data, str):
            data = ckpt.read(data)
        ckpt.validate_config(data["config"], self.config, STRICT_CONFIG, path)
        if data["step_in_epoch"]:
            ckpt.validate_config(data["config"], self.config, ("world_size", "batch_size"), path)
        ckpt.validate_model_state(data["model"], self.model, path)
        ckpt.validate_optimizer_state(data["optimizer"], self.optimizer, path)
        if not isinstance(data["scheduler"], dict):
            raise ckpt.CheckpointError(f"checkpoint {path!r}: scheduler state is malformed")
        self.model.load_state_dict(data["model"], strict=True)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        if self.scaler is not None and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        if data["config"].get("comm_hook") == self.config.get("comm_hook"):
            self.comm.load_state_dict(data.get("comm") or {})  # else: another hook, fresh counters
        _load_sampler_state(self.model, data.get("sampler_state") or {})
        if "rng" in data:
            torch.set_rng_state(data["rng"]["torch"])
        # a checkpoint from before the training clock: count from here
        self.clock = TrainClock(float(data.get("train_seconds", 0.0)))
        return int(data["epoch"]), int(data["step"]), int(data["step_in_epoch"])


def resolve_resume(args):
    """``--resume auto``, or any torchrun restart, continues from OUTPUT_DIR's checkpoint."""
    if args.resume == "auto" or (args.resume is None and _restart_count() > 0 and args.output_dir):
        path = os.path.join(args.output_dir, ckpt.LATEST)
        return path if os.path.isfile(path) else None
    return args.resume


def _fault_injection(rank):
    spec = os.environ.get(FAIL_ENV)
    if not spec or _restart_count() > 0:
        return None
    fail_rank, fail_step = (int(x) for x in spec.split(":"))
    if fail_rank != rank:
        return None
    return fail_step


def _make_scaler(device, amp):
    if not (amp and device.type == "cuda"):
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def main(args):
    """Train as ``args`` says; returns the last epoch's metrics (on every rank)."""
    from ..distributed import init_distributed

    validate(args)
    # Everything that can fail on a bad flag happens before the process group exists.
    train_set, val_set, info = build_datasets(args.dataset, args.data_path, args.image_size)
    model = build_training_model(args, info)
    resume = resolve_resume(args)
    resume_data = None
    if resume:  # a corrupt or foreign checkpoint is also a one-line error before the group exists
        resume_data = ckpt.read(resume)
        ckpt.validate_config(resume_data["config"], {"model": args.model, "dataset": args.dataset,
                                                     "num_classes": info.num_classes}, STRICT_CONFIG, resume)
        ckpt.validate_model_state(resume_data["model"], model, resume)
    global _HOROVOD
    _HOROVOD = args.dist == "horovod"  # set on every call: main() may run twice in one process
    if _HOROVOD:
        from .hvd import init

        rank, world_size, local_rank = init()
    else:
        rank, world_size, local_rank = init_distributed(args.backend)
    finished = False
    try:
        metrics = _run(args, model, train_set, val_set, info, rank, world_size, local_rank, (resume, resume_data))
        finished = True
        return metrics
    finally:
        if _distributed():
            shutdown_distributed(wait=finished)


def _run(args, model, train_set, val_set, info, rank, world_size, local_rank, resume):
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    log = MetricsLogger(args.output_dir, enabled=rank == 0)
    train_loader, val_loader, sampler = build_loaders(
        train_set, val_set, rank=rank, world_size=world_size, batch_size=args.batch_size,
        workers=args.workers, seed=args.seed)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = args.epochs * steps_per_epoch

    model.to(device)
    ddp = None
    if world_size > 1 and not _HOROVOD:
        # PyTorch's PowerSGD hook issues collectives from .then() callbacks, which gloo
        # cannot order across several buckets; one bucket sidesteps that.
        cap = 1024 if (args.comm_hook == "powersgd" and dist.get_backend() == "gloo") else args.bucket_cap_mb
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cap)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if _HOROVOD:
        from .hvd import wrap

        optimizer, comm = wrap(model, optimizer, args)
    else:
        if args.step_in_hook and ddp is None:
            log.info("--step-in-hook: one process, no comm hook; the optimizer steps after backward")
        comm = build_comm(ddp, args.comm_hook, agreement=args.agreement, powersgd_rank=args.powersgd_rank,
                          powersgd_start_iter=args.powersgd_start_iter,
                          optimizer=optimizer if args.step_in_hook else None,
                          overlap_forward=args.overlap_forward and ddp is not None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    scaler = _make_scaler(device, args.amp)
    config = {"model": args.model, "dataset": args.dataset, "num_classes": info.num_classes,
              "sample_ratio": args.sample_ratio, "minimal_k": args.minimal_k, "policy": args.policy,
              "comm_hook": args.comm_hook, "world_size": world_size, "batch_size": args.batch_size,
              "seed": args.seed, "epochs": args.epochs, "dist": args.dist}
    trainer = Trainer(args, model, ddp, optimizer, scheduler, scaler, comm, config, rank)

    epoch, step, step_in_epoch = 0, 0, 0
    resume_path, resume_data = resume
    if resume_data is not None:
        epoch, step, step_in_epoch = trainer.load(resume_data, resume_path)
        log.info(f"resumed from {resume_path} at epoch {epoch + 1} step {step} (restart {_restart_count()})")
    log.info(f"approxdist-train: {args.model} on {args.dataset}, {world_size} process(es) on {device.type}, "
             f"{steps_per_epoch} steps/epoch, sample_ratio {args.sample_ratio}, comm hook {args.comm_hook}")

    fail_step = _fault_injection(rank)
    net = ddp if ddp is not None else model
    clock = trainer.clock
    metrics = None
    while epoch < args.epochs and not (args.max_steps and step >= args.max_steps):
        sampler.set_epoch(epoch, step_in_epoch)
        epoch_first_step = step - step_in_epoch
        before = comm.stats()
        buckets_before = in_hook_steps(optimizer)
        progress = _progress(rank, args, steps_per_epoch, step_in_epoch, epoch)

        def on_step(s, _epoch=epoch, _first=epoch_first_step, _progress=progress):
            in_epoch = s - _first
            last = in_epoch >= steps_per_epoch or (args.max_steps and s >= args.max_steps)
            if args.eval_every and s % args.eval_every == 0 and not last:  # the epoch's end evaluates anyway
                _evaluate_mid_epoch(net, model, ddp, val_loader, device, args, clock, log, _progress,
                                    step=s, epoch=_epoch + in_epoch / steps_per_epoch)
            if args.checkpoint_every and s % args.checkpoint_every == 0 and in_epoch < steps_per_epoch:
                trainer.save(_epoch, s, in_epoch)
            if fail_step is not None and s == fail_step:
                os.kill(os.getpid(), signal.SIGKILL)

        epoch_start = clock.seconds
        clock.start()
        out = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, device=device, amp=args.amp,
                              step=step, max_steps=args.max_steps, on_step=on_step, progress=progress)
        finish_steps(ddp)  # --overlap-forward: the last step's transfer is training time too
        clock.stop()
        if progress is not None:
            progress.close()
        step = out["step"]
        step_in_epoch = step - epoch_first_step
        loss_sum, samples, rate = _sum_across_ranks(
            [out["loss_sum"], out["samples"], out["samples"] / max(clock.seconds - epoch_start, 1e-9)], device)
        metrics = evaluate(model, val_loader, device, amp=args.amp)
        after = comm.stats()
        finished_epoch = step_in_epoch >= steps_per_epoch
        metrics.update(
            epoch=epoch + 1, epochs=args.epochs, step=step, train_loss=loss_sum / max(samples, 1.0),
            images_per_s=rate, lr=optimizer.param_groups[0]["lr"], partial_epoch=not finished_epoch,
            payload_bytes=_delta(after, before, "payload_bytes"), dense_bytes=_delta(after, before, "dense_bytes"),
            payload_bytes_total=after["payload_bytes"], dense_bytes_total=after["dense_bytes"],
            world_size=world_size, sample_ratio=args.sample_ratio, comm_hook=args.comm_hook,
            in_hook_steps=in_hook_steps(optimizer) - buckets_before, train_seconds=clock.seconds)
        log.epoch(metrics)
        if finished_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        trainer.save(epoch, step, step_in_epoch)
    if metrics is None:  # resumed a run that had already finished
        metrics = evaluate(model, val_loader, device, amp=args.amp)
        metrics.update(epoch=epoch, epochs=args.epochs, step=step, **{k + "_total": v for k, v in comm.stats().items()
                                                                       if k != "steps"})
    log.close()
    return metrics


def _evaluate_mid_epoch(net, model, ddp, val_loader, device, args, clock, log, progress, *, step, epoch):
    """--eval-every: evaluate after `step`, on the clock's pause, then train on."""
    finish_steps(ddp)  # --overlap-forward: this step's transfer belongs to the training time
    with clock.paused():
        metrics = evaluate(model, val_loader, device, amp=args.amp)
        net.train()
    metrics.update(step=step, epoch=epoch, train_seconds=clock.seconds)
    log.evaluation(metrics, echo=progress.write if progress is not None else None)  # above the bar


def _delta(after, before, key):
    if after[key] is None or before[key] is None:
        return None
    return after[key] - before[key]


def _progress(rank, args, total, initial, epoch):
    if rank != 0 or args.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                dynamic_ncols=True, mininterval=0.5)


__all__ = ["main", "train_one_epoch", "evaluate", "build_training_model", "Trainer", "resolve_resume"]
