"""The `Trainer`: one run's objects, the loop over its epochs and steps, and the checkpoint
round trip over all of them.

One object owns the loop so that what a step, an evaluation or a checkpoint needs is an
attribute, not the ninth argument of a function. `Trainer.build` wires a run from the
parsed flags; `fit` trains it. Callbacks (`callbacks=`, each `fn(trainer, step)` after
every optimizer step) let a caller watch or interrupt the loop without the product
carrying test code: the elastic-restart test kills a worker through one.
"""
import copy
import json
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..distributed import finish_steps, in_hook_steps
from ..nn import load_sampler_state, sampler_state
from . import checkpoint as ckpt
from .augment import batch_mixer
from .clock import TrainClock
from .comm import build_comm
from .data import build_loaders
from .ema import ModelEMA, ema_decay
from .logs import MetricsLogger
from .loop import Placement, Recipe, evaluate, sum_across_ranks, train_one_epoch
from .models import build_plain_model, uses_sampled_layers
from .optim import build_optimizer
from .schedule import StepSchedule, build_scheduler

__all__ = ["Trainer", "StepCallback", "STRICT_CONFIG", "SAMPLING_CONFIG", "check_resume_config", "run_config", "restart_count"]

# Checkpoint fields that must match for a resume to make sense at all.
STRICT_CONFIG = ("model", "dataset", "num_classes")
# What the sampled layers do: another setting on resume trains another method from the
# middle on, so it is refused unless --allow-config-change says it is meant.
SAMPLING_CONFIG = ("sample_ratio", "budget", "minimal_k", "policy", "sample_mode", "explore", "norm_stats",
                   "norm_stats_every")
# The optimizer's settings are restored with its state: another flag on resume would be
# ignored silently, so it is refused too; --allow-config-change applies the new values.
OPTIMIZER_CONFIG = ("lr", "momentum", "weight_decay", "norm_weight_decay")
# The rest of the training recipe (torchvision's flags): another value trains another way
# from the resume on, refused unless --allow-config-change; the schedule's flags then put
# the new schedule at the position of the steps done.
RECIPE_CONFIG = ("lr_scheduler", "lr_step_size", "lr_gamma", "lr_warmup_epochs", "lr_warmup_method",
                 "lr_warmup_decay", "label_smoothing", "mixup_alpha", "cutmix_alpha", "auto_augment",
                 "random_erase", "clip_grad_norm", "model_ema", "model_ema_steps", "model_ema_decay",
                 "train_crop_size", "val_resize_size", "val_crop_size")
SCHEDULE_CONFIG = RECIPE_CONFIG[:6]  # --lr-scheduler ... --lr-warmup-decay
# Never changed on resume: the optimizer's state is of its kind (momentum buffers, Adam's
# moments), and --norm-weight-decay on or off changes its parameter groups.
OPTIMIZER_KIND = ("opt",)
# A mid-epoch checkpoint continues the epoch's data order where it stopped: that order is
# a function of the seed (the world size and batch only shard it; see the sampler).
MID_EPOCH_CONFIG = ("seed",)


def run_config(args, num_classes):
    """What a checkpoint records of the run that a resume checks before any process group
    exists (Trainer.build adds the world size, batch and the rest)."""
    return {"model": args.model, "dataset": args.dataset, "num_classes": num_classes,
            "sample_ratio": args.sample_ratio, "budget": args.budget, "minimal_k": args.minimal_k,
            "policy": args.policy, "sample_mode": args.sample_mode, "explore": args.explore,
            "norm_stats": args.norm_stats,
            "norm_stats_every": args.norm_stats_every, "lr": args.lr, "momentum": args.momentum,
            "weight_decay": args.weight_decay, "opt": args.opt, "norm_weight_decay": args.norm_weight_decay,
            **{k: getattr(args, k) for k in RECIPE_CONFIG}}


def check_resume_config(saved, current, path, *, allow_changes=False, mid_epoch=False):
    """Raise CheckpointError naming every setting that forbids resuming from `path`. Keys
    an older checkpoint lacks are not compared; --explore only matters to topk_explore."""
    ckpt.validate_config(saved, current, STRICT_CONFIG, path)
    kind = [f"{k}={saved[k]!r} (now {current.get(k)!r})" for k in OPTIMIZER_KIND
            if saved.get(k, "sgd") != current.get(k, "sgd")]
    if "norm_weight_decay" in saved and (saved["norm_weight_decay"] is None) != (current.get("norm_weight_decay") is None):
        kind.append("norm_weight_decay on/off (its own parameter group)")
    if kind:
        raise ckpt.CheckpointError(
            f"checkpoint {path!r} has an optimizer state this run cannot continue: {', '.join(kind)}; resume "
            "with the same --opt and --norm-weight-decay, or start a fresh run from its weights (--weights)")
    if not allow_changes:
        keys = [k for k in SAMPLING_CONFIG + OPTIMIZER_CONFIG + RECIPE_CONFIG if k in saved
                and (k != "explore" or "topk_explore" in (saved.get("policy"), current.get("policy")))]
        diffs = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]
        if diffs:
            raise ckpt.CheckpointError(
                f"checkpoint {path!r} was made with other settings: {', '.join(diffs)}; resume with the "
                "same flags, start a fresh --output-dir, or pass --allow-config-change")
    if mid_epoch:
        diffs = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in MID_EPOCH_CONFIG
                 if k in saved and saved.get(k) != current.get(k)]
        if diffs:
            raise ckpt.CheckpointError(
                f"checkpoint {path!r} was saved mid-epoch with {', '.join(diffs)}: its epoch's data order cannot "
                "continue with another seed; resume it with the same --seed")

StepCallback = Callable[["Trainer", int], None]


def restart_count():
    """torchrun's restart number of this worker (0 on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _make_scaler(device, amp):
    if not (amp and device.type == "cuda"):
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _delta(after, before, key):
    if after[key] is None or before[key] is None:
        return None
    return after[key] - before[key]


class Trainer:
    """One run. `args` are approxdist-train's parsed flags; `config` what a checkpoint
    records of the run (and checks on resume). Only the checkpoint round trip needs the
    first four and `config`; `fit` needs what `build` wires (device, loaders, log)."""

    def __init__(self, args, model, optimizer, scheduler, *, config, ddp=None, scaler=None, comm=None,
                 place=Placement(), device=torch.device("cpu"), loaders=(None, None, None), log=None,
                 callbacks: Sequence[StepCallback] = (), ema=None, recipe=Recipe()):
        self.args, self.model, self.ddp = args, model, ddp
        self.optimizer, self.scheduler, self.scaler, self.comm = optimizer, scheduler, scaler, comm
        self.config, self.place, self.device = config, place, device
        self.train_loader, self.val_loader, self.sampler = loaders
        self.log = log
        self.callbacks = tuple(callbacks)
        self.ema, self.recipe = ema, recipe
        self.clock = TrainClock()
        self.resume_notes = []
        self._resume_sample = None  # where a resumed epoch starts in its data order, in samples

    @property
    def rank(self):
        return self.place.rank

    @property
    def net(self):
        """What the steps call: DDP's wrapper where there is one, else the model."""
        return self.ddp if self.ddp is not None else self.model

    @classmethod
    def build(cls, args, model, datasets, place: Placement, callbacks: Sequence[StepCallback] = ()):
        """Device, loaders, DDP (or Horovod's optimizer), comm hook, schedule and scaler for
        `model` (already built, on the CPU); datasets: (train_set, val_set, info)."""
        train_set, val_set, info = datasets
        if torch.cuda.is_available():
            device = torch.device("cuda", place.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        log = MetricsLogger(args.output_dir, enabled=place.rank == 0)
        loaders = build_loaders(train_set, val_set, rank=place.rank, world_size=place.world_size,
                                batch_size=args.batch_size, workers=args.workers, seed=args.seed)

        model.to(device)
        ddp = None
        if place.world_size > 1 and not place.horovod:
            # PyTorch's PowerSGD hook issues collectives from .then() callbacks, which gloo
            # cannot order across several buckets; one bucket sidesteps that.
            cap = 1024 if (args.comm_hook == "powersgd" and dist.get_backend() == "gloo") else args.bucket_cap_mb
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cap)
        optimizer = build_optimizer(model, args)
        if place.horovod:
            from .hvd import wrap

            optimizer, comm = wrap(model, optimizer, args)
        else:
            if args.step_in_hook and ddp is None:
                log.info("--step-in-hook: one process, no comm hook; the optimizer steps after backward")
            comm = build_comm(ddp, args.comm_hook, agreement=args.agreement, powersgd_rank=args.powersgd_rank,
                              powersgd_start_iter=args.powersgd_start_iter,
                              optimizer=optimizer if args.step_in_hook else None,
                              overlap_forward=args.overlap_forward and ddp is not None)
        scheduler = build_scheduler(optimizer, args, loaders[2].batches_per_epoch)
        config = dict(run_config(args, info.num_classes), comm_hook=args.comm_hook, world_size=place.world_size,
                      batch_size=args.batch_size, seed=args.seed, epochs=args.epochs, dist=args.dist)
        ema = None
        if args.model_ema:
            decay = ema_decay(args.model_ema_decay, place.world_size, args.batch_size, args.model_ema_steps,
                              args.epochs)
            with torch.random.fork_rng(devices=[]):  # its initial weights are replaced: draw nothing
                ema = ModelEMA(build_plain_model(args, info).to(device), decay)
            ema.update(model, copy=True)  # the model's copy; the first update copies again (torchvision)
        recipe = Recipe(label_smoothing=args.label_smoothing,
                        mixer=batch_mixer(args.mixup_alpha, args.cutmix_alpha, info.num_classes),
                        clip_grad_norm=args.clip_grad_norm, channels_last=args.channels_last, seed=args.seed)
        return cls(args, model, optimizer, scheduler, config=config, ddp=ddp, scaler=_make_scaler(device, args.amp),
                   comm=comm, place=place, device=device, loaders=loaders, log=log, callbacks=callbacks, ema=ema,
                   recipe=recipe)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume=(None, None)):
        """Train from the start, or from `resume` = (path, checkpoint data already read);
        returns the last epoch's metrics (on every rank)."""
        args, log = self.args, self.log
        steps_per_epoch = self.sampler.batches_per_epoch
        epoch, step, step_in_epoch = 0, 0, 0
        resume_path, resume_data = resume
        self.write_args()
        if self.rank == 0 and args.output_dir:
            stale = ckpt.remove_stale_temps(args.output_dir)
            if stale:
                log.info(f"removed {len(stale)} temporary file(s) of an interrupted save: {', '.join(stale)}")
        if resume_data is not None:
            epoch, step, step_in_epoch = self.load(resume_data, resume_path)
            log.info(f"resumed from {resume_path} at epoch {epoch + 1} step {step} (restart {restart_count()})")
            for note in self.resume_notes:
                log.info(note)
        elif self.rank == 0 and args.output_dir:  # a fresh start (--overwrite, or nothing to resume)
            old = os.path.join(args.output_dir, ckpt.LATEST)
            if os.path.exists(old):
                os.unlink(old)
        dropped = log.rewind(step)
        if dropped:
            log.info(f"metrics.jsonl: dropped {dropped} record(s) after step {step}, which this run makes again")
        log.info(f"approxdist-train: {args.model} on {args.dataset}, {self.place.world_size} process(es) on "
                 f"{self.device.type}, {steps_per_epoch} steps/epoch, sample_ratio {args.sample_ratio}, "
                 f"comm hook {args.comm_hook}")
        metrics = None
        while epoch < args.epochs and not (args.max_steps and step >= args.max_steps):
            metrics, step, step_in_epoch = self._epoch(epoch, step, step_in_epoch)
            if step_in_epoch >= steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            self.save(epoch, step, step_in_epoch)
        if metrics is None:  # resumed a run that had already finished
            metrics = self.evaluate()
            metrics.update(epoch=epoch, epochs=args.epochs, step=step,
                           **{k + "_total": v for k, v in self.comm.stats().items() if k != "steps"})
        log.close()
        return metrics

    def evaluate(self):
        """The model's metrics, and with --model-ema the average's as ema_val_loss, ema_top1, ..."""
        kw = dict(amp=self.args.amp, horovod=self.place.horovod, channels_last=self.recipe.channels_last)
        metrics = evaluate(self.model, self.val_loader, self.device, **kw)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.device, **kw)
            metrics.update({f"ema_{k}": v for k, v in ema.items() if k != "val_samples"})
        return metrics

    def write_args(self):
        """OUTPUT_DIR/args.json: this start's flags (rank 0, atomically), every start."""
        if self.rank != 0 or not self.args.output_dir:
            return
        path = os.path.join(self.args.output_dir, "args.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(vars(self.args), f, indent=1, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)

    def _epoch(self, epoch, step, step_in_epoch):
        """Train epoch `epoch` from `step` (`step_in_epoch` of it done), evaluate it;
        (metrics, step reached, steps of the epoch done)."""
        args, clock = self.args, self.clock
        steps_per_epoch = self.sampler.batches_per_epoch
        self.sampler.set_epoch(epoch, step_in_epoch, start_sample=self._resume_sample)
        self._resume_sample = None
        first, start = step - step_in_epoch, step
        before = self.comm.stats()
        buckets_before = in_hook_steps(self.optimizer)
        progress = self._progress(steps_per_epoch, step_in_epoch, epoch)

        epoch_start = clock.seconds
        clock.start()
        out = train_one_epoch(self.net, self.train_loader, self.optimizer, self.scheduler, self.scaler,
                              device=self.device, amp=args.amp, step=step, max_steps=args.max_steps,
                              on_step=lambda s, loss: self._after_step(s, epoch, first, progress, loss),
                              progress=progress, recipe=self.recipe)
        finish_steps(self.ddp)  # --overlap-forward: the last step's transfer is training time too
        clock.stop()
        if progress is not None:
            progress.close()
        step = out["step"]
        step_in_epoch = step - first
        loss_sum, samples, rate = sum_across_ranks(
            [out["loss_sum"], out["samples"], out["samples"] / max(clock.seconds - epoch_start, 1e-9)], self.device,
            horovod=self.place.horovod)
        metrics = self.evaluate()
        after = self.comm.stats()
        metrics.update(
            epoch=epoch + 1, epochs=args.epochs, step=step, train_loss=loss_sum / max(samples, 1.0),
            images_per_s=rate, lr=self.optimizer.param_groups[0]["lr"],
            # train_loss and images_per_s cover train_steps steps: fewer than the epoch's when
            # it was resumed mid-way (the steps before are in the previous attempt's records)
            # or stopped by --max-steps
            train_steps=step - start, partial_epoch=step - start < steps_per_epoch,
            payload_bytes=_delta(after, before, "payload_bytes"), dense_bytes=_delta(after, before, "dense_bytes"),
            payload_bytes_total=after["payload_bytes"], dense_bytes_total=after["dense_bytes"],
            world_size=self.place.world_size, sample_ratio=args.sample_ratio, comm_hook=args.comm_hook,
            in_hook_steps=in_hook_steps(self.optimizer) - buckets_before, train_seconds=clock.seconds)
        self.log.epoch(metrics)
        return metrics, step, step_in_epoch

    def _after_step(self, step, epoch, first, progress, loss=None):
        """After global step `step` of epoch `epoch` (which began at step `first`): the EMA
        update, the --print-freq line, the mid-epoch evaluation and checkpoint when due,
        then the callbacks."""
        args = self.args
        steps_per_epoch = self.sampler.batches_per_epoch
        in_epoch = step - first
        if self.ema is not None and step % args.model_ema_steps == 0:
            finish_steps(self.ddp)  # --overlap-forward: the step in flight lands before it is averaged
            self.ema.update(self.model, copy=epoch < args.lr_warmup_epochs)  # warm-up: copies (torchvision)
        if args.print_freq and step % args.print_freq == 0 and self.rank == 0:
            line = (f"epoch {epoch + 1} step {step} ({in_epoch}/{steps_per_epoch}) loss {loss:.4f} "
                    f"lr {self.optimizer.param_groups[0]['lr']:.6g} train {self.clock.seconds:.1f} s")
            (progress.write if progress is not None else self.log.info)(line)
        last = in_epoch >= steps_per_epoch or (args.max_steps and step >= args.max_steps)
        if args.eval_every and step % args.eval_every == 0 and not last:  # the epoch's end evaluates anyway
            self._evaluate_mid_epoch(step, epoch + in_epoch / steps_per_epoch, progress)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and in_epoch < steps_per_epoch:
            self.save(epoch, step, in_epoch)
        for callback in self.callbacks:
            callback(self, step)

    def _evaluate_mid_epoch(self, step, epoch, progress):
        """--eval-every: evaluate after `step`, on the clock's pause, then train on."""
        finish_steps(self.ddp)  # --overlap-forward: this step's transfer belongs to the training time
        with self.clock.paused():
            metrics = self.evaluate()
            self.net.train()
        totals = self.comm.stats()
        metrics.update(step=step, epoch=epoch, train_seconds=self.clock.seconds,
                       payload_bytes_total=totals["payload_bytes"], dense_bytes_total=totals["dense_bytes"])
        self.log.evaluation(metrics, echo=progress.write if progress is not None else None)  # above the bar

    def _progress(self, total, initial, epoch):
        if self.rank != 0 or self.args.no_progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False,
                    dynamic_ncols=True, mininterval=0.5)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_payload(self, epoch, step, step_in_epoch):
        uses_layers = uses_sampled_layers(self.args)
        return {
            "format": ckpt.FORMAT,
            "config": self.config,
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            # samples of the epoch's order used: what a resume on another world size goes on from
            "epoch_sample": self.sampler.consumed(step_in_epoch) if self.sampler is not None and step_in_epoch else 0,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "comm": self.comm.state_dict(),
            "sampler_state": sampler_state(self.model) if uses_layers else {},
            "model_ema": self.ema.state_dict() if self.ema is not None else {},
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
        """Validate everything, then load everything: a bad file changes nothing. Should
        applying fail anyway, what was applied is rolled back. Every error names `path`.

        A checkpoint of another --epochs or world size continues on this run's learning-rate
        schedule: the cosine then spans this run's length, at the position of the epochs
        (and steps) done; `resume_notes` says what changed, for the log."""
        if isinstance(data, str):
            data = ckpt.read(data)
        saved = data["config"]
        check_resume_config(saved, self.config, path, allow_changes=getattr(self.args, "allow_config_change", False),
                            mid_epoch=bool(data["step_in_epoch"]))
        ckpt.validate_model_state(data["model"], self.model, path)
        ckpt.validate_optimizer_state(data["optimizer"], self.optimizer, path)
        if not isinstance(data["scheduler"], dict):
            raise ckpt.CheckpointError(f"checkpoint {path!r}: scheduler state is malformed")
        ema_state = data.get("model_ema") or {}
        if self.ema is not None and ema_state:
            if not isinstance(ema_state.get("module"), dict) or "updates" not in ema_state:
                raise ckpt.CheckpointError(f"checkpoint {path!r}: model_ema state is malformed")
            ckpt.validate_model_state(ema_state["module"], self.ema.module, path)
        state = data.get("sampler_state") or {}
        layers = sampler_state(self.model)
        if state and set(state) != set(layers):
            missing, unexpected = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
            raise ckpt.CheckpointError(f"checkpoint {path!r}: its sampler state does not fit this model's sampled "
                                       f"layers (missing {missing[:3]}, unexpected {unexpected[:3]})")
        before = self._snapshot()
        try:
            self._apply(data, state)
        except Exception as exc:
            self._restore(before)
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ckpt.CheckpointError(f"checkpoint {path!r} could not be loaded, nothing changed: {detail}") from None
        epoch, step, step_in_epoch = int(data["epoch"]), int(data["step"]), int(data["step_in_epoch"])
        self.resume_notes = self._resize_notes(saved)
        if step_in_epoch and self.sampler is not None:
            epoch, step_in_epoch = self._reshard_epoch(data, epoch, step_in_epoch)
        if self.ema is not None and not ema_state:
            self.resume_notes.append("--model-ema: the checkpoint holds no average; it starts from its weights")
        changed = self._apply_optimizer_flags(saved)
        reshaped = [k for k in SCHEDULE_CONFIG if k in saved and saved[k] != self.config.get(k)]
        self.resume_notes += self._retarget_schedule(epoch, step_in_epoch, saved, force=bool(changed or reshaped))
        return epoch, step, step_in_epoch

    def _apply_optimizer_flags(self, saved):
        """With --allow-config-change, this run's --lr, --momentum and --weight-decay replace
        the restored ones (the learning rate as the schedule's peak)."""
        args = self.args
        changed = [k for k in OPTIMIZER_CONFIG if k in saved and saved[k] != self.config.get(k)]
        if not changed:
            return []
        decays = [args.weight_decay, args.weight_decay if args.norm_weight_decay is None else args.norm_weight_decay]
        for group, decay in zip(self.optimizer.param_groups, decays):
            group["weight_decay"] = decay
            if "momentum" in group:
                group["momentum"] = args.momentum
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [args.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = args.lr
        self.resume_notes.append("--allow-config-change: " + ", ".join(
            f"{k} {saved[k]} -> {self.config[k]}" for k in changed))
        return changed

    def _reshard_epoch(self, data, epoch, step_in_epoch):
        """A mid-epoch checkpoint goes on from the samples its epoch has used. On the same
        world size and batch that is its own step_in_epoch; on others, this run's epoch is
        at the step that leaves as many whole global batches as the rest of the order holds
        (the same drop-last rule as a whole epoch); with none left, the next epoch begins."""
        saved = data["config"]
        consumed = int(data.get("epoch_sample") or step_in_epoch * saved["world_size"] * saved["batch_size"])
        sampler = self.sampler
        left = (sampler.n - consumed) // sampler.global_batch
        new_step = sampler.batches_per_epoch - max(min(left, sampler.batches_per_epoch), 0)
        if new_step != step_in_epoch:
            self.resume_notes.append(
                f"mid-epoch resize: epoch {epoch + 1} goes on from sample {consumed} of its order, {left} step(s) "
                f"of {sampler.global_batch} left (step {new_step} of {sampler.batches_per_epoch} here)")
        if left <= 0:
            return epoch + 1, 0
        self._resume_sample = consumed
        return epoch, new_step

    def _apply(self, data, state):
        self.model.load_state_dict(data["model"], strict=True)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        if self.scaler is not None and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        if data["config"].get("comm_hook") == self.config.get("comm_hook"):
            self.comm.load_state_dict(data.get("comm") or {})  # else: another hook, fresh counters
        if state:
            load_sampler_state(self.model, state)
        if self.ema is not None:
            if data.get("model_ema"):
                self.ema.load_state_dict(data["model_ema"])
            else:
                self.ema.update(self.model, copy=True)
        if "rng" in data:
            torch.set_rng_state(data["rng"]["torch"])
        # a checkpoint from before the training clock: count from here
        self.clock = TrainClock(float(data.get("train_seconds", 0.0)))

    def _snapshot(self):
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "comm": copy.deepcopy(self.comm.state_dict()),
                "sampler": copy.deepcopy(sampler_state(self.model)),
                "ema": copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None,
                "rng": torch.get_rng_state(), "clock": self.clock}

    def _restore(self, snap):
        self.model.load_state_dict(snap["model"], strict=True)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if snap["scaler"] is not None:
            self.scaler.load_state_dict(snap["scaler"])
        self.comm.load_state_dict(snap["comm"])
        if snap["sampler"]:
            load_sampler_state(self.model, snap["sampler"])
        if snap["ema"] is not None:
            self.ema.load_state_dict(snap["ema"])
        torch.set_rng_state(snap["rng"])
        self.clock = snap["clock"]

    def _retarget_schedule(self, epoch, step_in_epoch, saved, force=False):
        """Put the loaded schedule on this run's length, at the position of the epochs done
        (`epoch` whole ones plus `step_in_epoch` steps); a no-op for an exact resume. The
        schedule is a closed form of the step (schedule.py), so this is its whole state."""
        sched = self.scheduler
        if not isinstance(sched, StepSchedule) or self.sampler is None:
            return []
        spe = self.sampler.batches_per_epoch
        span, position = self.args.epochs * spe, epoch * spe + step_in_epoch
        old_span = int(saved.get("epochs", self.args.epochs)) * int(
            self._saved_steps_per_epoch(saved) or spe)
        if sched.last_epoch == position and old_span == span and not force:
            return []
        old_lr = self.optimizer.param_groups[0]["lr"]
        sched.place(span, spe, position)
        lr = self.optimizer.param_groups[0]["lr"]
        if old_span == span and lr == old_lr:
            return []
        return [f"learning-rate schedule: the checkpoint's spanned {old_span} steps; this run's {sched.kind} over "
                f"{self.args.epochs} epoch(s) x {spe} steps spans {span}; it continues at step {position} of "
                f"{span} (lr {old_lr:.6g} -> {lr:.6g})"]

    def _saved_steps_per_epoch(self, saved):
        """Steps per epoch of the run that saved (its global batch over this data set)."""
        if self.sampler is None or not saved.get("world_size") or not saved.get("batch_size"):
            return None
        return self.sampler.n // (int(saved["world_size"]) * int(saved["batch_size"]))

    def _resize_notes(self, saved):
        old_world, old_batch = saved.get("world_size"), saved.get("batch_size")
        world, batch = self.config.get("world_size"), self.config.get("batch_size")
        if old_world is None or old_batch is None or (old_world, old_batch) == (world, batch):
            return []
        return [f"elastic resize: world size {old_world} -> {world}, global batch {old_world * old_batch} -> "
                f"{world * batch} ({batch} per process); the data is re-sharded over {world} process(es)"]
