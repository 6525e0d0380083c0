"""The learning-rate schedule of `approxdist-train`: torchvision's `--lr-scheduler` choices
and warm-up, as one closed form of the global step.

torchvision's references/classification steps its schedulers once per epoch and chains a
warm-up scheduler and the main one with SequentialLR. Here the rate is a function of the
step alone (`StepSchedule.factor`): the cosine and the linear warm-up move every step (the
cosine always did here), StepLR and ExponentialLR change at epoch boundaries as in
torchvision, and the main schedule starts after the warm-up and spans the epochs after it,
as SequentialLR's milestone does there. A closed form is what makes resumes simple: the
position (`last_epoch`, in steps) is the whole state, a resume on another world size or
--epochs re-places the schedule at the epochs done (`place`), and new flags under
--allow-config-change apply from there on.
"""
import math

from torch.optim.lr_scheduler import LRScheduler

SCHEDULERS = ("cosineannealinglr", "steplr", "exponentiallr")
WARMUP_METHODS = ("constant", "linear")


class StepSchedule(LRScheduler):
    """lr(step) = base_lr * warm-up factor * main-schedule factor; stepped once per step."""

    def __init__(self, optimizer, *, kind="cosineannealinglr", total_steps, steps_per_epoch, step_size=30,
                 gamma=0.1, warmup_epochs=0, warmup_method="constant", warmup_decay=0.01, last_epoch=-1):
        if kind not in SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"--lr-warmup-method must be one of {', '.join(WARMUP_METHODS)}, got {warmup_method!r}")
        self.kind, self.step_size, self.gamma = kind, step_size, gamma
        self.warmup_epochs, self.warmup_method, self.warmup_decay = warmup_epochs, warmup_method, warmup_decay
        self.total_steps, self.steps_per_epoch = max(int(total_steps), 1), max(int(steps_per_epoch), 1)
        super().__init__(optimizer, last_epoch)

    @property
    def warmup_steps(self):
        return min(self.warmup_epochs * self.steps_per_epoch, self.total_steps)

    def factor(self, step):
        """The multiple of the base rate at global step `step` (0: the first step's rate)."""
        warm = self.warmup_steps
        if step < warm:
            if self.warmup_method == "linear":
                return self.warmup_decay + (1.0 - self.warmup_decay) * step / warm
            return self.warmup_decay
        t, span = step - warm, max(self.total_steps - warm, 1)
        if self.kind == "steplr":
            return self.gamma ** (t // (self.step_size * self.steps_per_epoch))
        if self.kind == "exponentiallr":
            return self.gamma ** (t // self.steps_per_epoch)
        return (1.0 + math.cos(math.pi * min(t, span) / span)) / 2.0

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def place(self, total_steps, steps_per_epoch, position):
        """Span `total_steps` steps of `steps_per_epoch` and stand at step `position`."""
        self.total_steps, self.steps_per_epoch = max(int(total_steps), 1), max(int(steps_per_epoch), 1)
        self.last_epoch = int(position)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def load_state_dict(self, state_dict):
        """The position and the base rates; the schedule's shape is this run's (its flags,
        checked against the checkpoint's config before). A checkpoint of the former
        CosineAnnealingLR loads the same way."""
        for key in ("last_epoch", "base_lrs", "_step_count", "_last_lr"):
            if key in state_dict:
                setattr(self, key, state_dict[key])


def build_scheduler(optimizer, args, steps_per_epoch):
    """The schedule `args` ask for over `args.epochs` epochs of `steps_per_epoch` steps."""
    return StepSchedule(optimizer, kind=args.lr_scheduler, total_steps=args.epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch, step_size=args.lr_step_size, gamma=args.lr_gamma,
                        warmup_epochs=args.lr_warmup_epochs, warmup_method=args.lr_warmup_method,
                        warmup_decay=args.lr_warmup_decay)


__all__ = ["SCHEDULERS", "WARMUP_METHODS", "StepSchedule", "build_scheduler"]
