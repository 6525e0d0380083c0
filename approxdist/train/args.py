"""Command-line flags of `approxdist-train` and their validation.

Everything here runs before a process group exists: a bad flag must cost one line on
stderr and a non-zero exit, not a rendezvous timeout on the other ranks.
"""
import argparse
import math
import os
import sys
import tempfile

from ..distributed import collective_timeout
from .augment import AUTO_AUGMENT
from .comm import SPARSE_HOOKS
from .data import DATASETS, check_data_path, default_workers, detect_dataset
from .models import BUILTIN, check_model_name
from .optim import OPTIMIZERS
from .schedule import SCHEDULERS, WARMUP_METHODS

COMM_HOOKS = ("allreduce", "fp16", "bf16", "powersgd", *SPARSE_HOOKS)
# Policies of the distributed sampled layers: both pick the same channels on every rank
# without communication (from the weights, or from a generator seeded alike everywhere).
POLICIES = ("topk_weight", "topk_explore", "bernoulli_weight")
AGREEMENTS = ("local", "check", "broadcast")
BACKENDS = ("nccl", "gloo")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, unless its help already says what the default is;
    lines never break inside a flag's name (--overlap-/forward)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def resolve_workers(value, dataset):
    """--workers: 'auto' (see default_workers) or a count >= 0, as an int."""
    if value == "auto":
        return default_workers(dataset, local_processes())
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ValueError(f"--workers must be 'auto' or a number >= 0, got {value!r}")
    return n


def local_processes():
    """Processes of this job on this node, from the launcher's environment (1 without one)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        try:
            return max(int(os.environ[var].split("(")[0]), 1)
        except (KeyError, ValueError):
            continue
    return 1


# What the in-hook optimizer step (--step-in-hook, --overlap-forward) cannot run with, and
# why: the hook steps each bucket as soon as that bucket is reduced.
REFUSED_IN_HOOK = {
    "clip_grad_norm": "--clip-grad-norm needs the norm of the whole gradient before any parameter is stepped, "
                      "and the in-hook step steps each bucket as soon as it is reduced",
}
# ... and what --overlap-forward alone cannot: its steps land inside the next forward.
REFUSED_OVERLAP = {
    "sync_bn": "--sync-bn all-reduces BatchNorm statistics inside the forward, where --overlap-forward "
               "still has the last step's reductions in flight",
}
IN_HOOK_NOTE = " Refused with --step-in-hook and --overlap-forward."


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; a launcher that starts 64 processes
    turns that into 64 blocks. One line each is enough to see what went wrong."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog="approxdist-train"):
    p = OneLineParser(prog=prog, formatter_class=DefaultsFormatter,
                      description="Data-parallel training with approximate layers and a sparse all-reduce hook. "
                                  "The training flags follow torchvision's references/classification/train.py "
                                  "(docs/train.md).")
    p.add_argument("--model", default="cnn", help="cnn, mlp, or any torchvision classification model (resnet50, ...)")
    p.add_argument("--width", type=int, default=None,
                   help="built-in models only: cnn's first convolution's channels (default 32, the others twice "
                        "that), mlp's hidden units (default 256)")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="default: what --data-path holds (imagefolder or cifar10), digits without --data-path")
    p.add_argument("--data-path", default=None, help="ImageFolder root (train/, val/) or CIFAR-10 python batches")
    p.add_argument("--image-size", type=int, default=None, help="crop size for imagefolder (224) and fake data (32); digits: upscaled to this size in 3 channels (default 8, 1 channel)")
    p.add_argument("--train-crop-size", type=int, default=None,
                   help="imagefolder: RandomResizedCrop size (default: --image-size, else 224)")
    p.add_argument("--val-resize-size", type=int, default=None,
                   help="imagefolder: validation Resize (default: the validation crop / 0.875, 256 for 224)")
    p.add_argument("--val-crop-size", type=int, default=None,
                   help="imagefolder: validation CenterCrop (default: --image-size, else 224)")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per process and step")
    p.add_argument("--opt", default="sgd", type=str.lower, choices=OPTIMIZERS,
                   help="optimizer (torchvision's: rmsprop with eps 0.0316, alpha 0.9; adamw without momentum)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of sgd, sgd_nesterov and rmsprop")
    p.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=1e-4, help="weight decay")
    p.add_argument("--norm-weight-decay", type=float, default=None,
                   help="weight decay of the normalisation layers' parameters (default: --weight-decay's)")
    p.add_argument("--lr-scheduler", default="cosineannealinglr", type=str.lower, choices=SCHEDULERS,
                   help="after the warm-up, over the remaining epochs; the cosine moves every step, steplr and "
                        "exponentiallr at epoch boundaries")
    p.add_argument("--lr-step-size", type=int, default=30, help="steplr: epochs between decays")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="steplr, exponentiallr: the decay factor")
    p.add_argument("--lr-warmup-epochs", type=int, default=0, help="epochs of warm-up (moving every step)")
    p.add_argument("--lr-warmup-method", default="constant", type=str.lower, choices=WARMUP_METHODS,
                   help="constant: --lr-warmup-decay x lr; linear: from that up to lr")
    p.add_argument("--lr-warmup-decay", type=float, default=0.01, help="the warm-up's first lr factor")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy, in [0, 1)")
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp's Beta(alpha, alpha); 0: off")
    p.add_argument("--cutmix-alpha", type=float, default=0.0,
                   help="CutMix's Beta(alpha, alpha); 0: off (with --mixup-alpha, one of them per batch)")
    p.add_argument("--auto-augment", default=None, choices=AUTO_AUGMENT,
                   help="policy applied to training images (imagefolder, cifar10; default: none)")
    p.add_argument("--ra-magnitude", type=int, default=9, help="--auto-augment ra: RandAugment's magnitude")
    p.add_argument("--augmix-severity", type=int, default=3, help="--auto-augment augmix: AugMix's severity")
    p.add_argument("--random-erase", type=float, default=0.0, help="RandomErasing probability of a training image")
    p.add_argument("--clip-grad-norm", type=float, default=None,
                   help="clip the gradients' total norm to this (default: no clipping)." + IN_HOOK_NOTE)
    p.add_argument("--model-ema", action="store_true",
                   help="keep an exponential moving average of the weights; evaluations report it too "
                        "(ema_top1, ...). With --overlap-forward each update waits for the step in flight")
    p.add_argument("--model-ema-steps", type=int, default=32, help="steps between two EMA updates")
    p.add_argument("--model-ema-decay", type=float, default=0.99998,
                   help="EMA decay, adjusted as torchvision does to world size x batch x steps / epochs")
    p.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm as SyncBatchNorm (CUDA only: torch syncs no CPU tensors; refused with "
                        "--overlap-forward and --dist horovod)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in channels_last memory format (sampled layers keep --weight-layout)")
    p.add_argument("--weights", default=None,
                   help="start from this local state_dict file (torch.save of model.state_dict(), or an "
                        "approxdist-train checkpoint); nothing is downloaded")
    p.add_argument("--test-only", action="store_true",
                   help="evaluate --weights (or --resume's checkpoint, its EMA too) and exit; writes nothing")
    p.add_argument("--print-freq", type=int, default=0, help="rank 0 prints a line every N steps; 0: none")
    p.add_argument("-j", "--workers", default="auto",
                   help="data loader worker processes per rank; auto: 0 for digits and fake (in memory), "
                        "min(8, CPUs per process) for imagefolder and cifar10")
    p.add_argument("--sample-ratio", type=float, default=1.0, help="fraction of channels kept by sampled layers, in (0, 1]")
    p.add_argument("--minimal-k", type=int, default=1, help="keep at least this many channels per layer")
    p.add_argument("--policy", default="topk_explore", choices=POLICIES,
                   help="channel selection of the sampled layers: topk_explore (default) trains every weight; "
                        "topk_weight settles on a fixed top-k")
    p.add_argument("--sample-mode", default="weight_grad", choices=("weight_grad", "forward", "blackbox"),
                   help="weight_grad (default): exact forward, only the selected channels' weight gradient is "
                        "computed and sent, so the model evaluates as it trained; forward: the forward is "
                        "sampled too (less compute, an accuracy cost: docs/benchmarks.md, Fidelity)")
    p.add_argument("--allow-unbiased-sampling", action="store_true",
                   help="accept --policy bernoulli_weight below --sample-ratio 1: its unbiased 1/p scaling "
                        "made the digits CNN diverge (docs/design.md)")
    p.add_argument("--budget", type=float, default=None,
                   help="instead of --sample-ratio: the fraction of the dense gradient bytes sent per step, "
                        "spread as per-layer ratios (convert_model(budget=...)), in (0, 1]")
    p.add_argument("--explore", type=float, default=0.1,
                   help="--policy topk_explore: the share of the k channels taken from the rotation, in [0, 1]")
    p.add_argument("--norm-stats", default="exact", choices=("exact", "sampled"),
                   help="BatchNorm running statistics from an extra exact no-grad forward of a quarter of the "
                        "batch (exact, the default: eval() then measures what the model learned) or from the "
                        "sampled forward")
    p.add_argument("--norm-stats-every", type=int, default=1,
                   help="run that exact pass on every N-th training step only (cheaper, costs some accuracy)")
    p.add_argument("--comm-hook", default="allreduce", choices=COMM_HOOKS,
                   help="sparse-fp16 / sparse-bf16: the sparse hook's sampled slices sent in 16 bits")
    p.add_argument("--agreement", default="local", choices=AGREEMENTS, help="index agreement of the sparse hook")
    p.add_argument("--powersgd-rank", type=int, default=1, help="matrix approximation rank for --comm-hook powersgd")
    p.add_argument("--powersgd-start-iter", type=int, default=2, help="steps of plain all-reduce before PowerSGD")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP's bucket_cap_mb (default 25, DDP's own; smaller buckets start the transfer earlier, "
                        "5 suits the sparse hook on slow links; PowerSGD on gloo always gets one bucket)")
    p.add_argument("--step-in-hook", action="store_true",
                   help="step the optimizer inside the comm hook, bucket by bucket, as each bucket is reduced: "
                        "the step overlaps the transfer of later buckets and sampled layers gather their next "
                        "forward's weights there (same parameters bit for bit; torch DDP only, not with --amp on "
                        "CUDA nor --clip-grad-norm)")
    p.add_argument("--overlap-forward", action="store_true",
                   help="like --step-in-hook, but backward returns once every bucket's collective is launched and the "
                        "next forward overlaps the transfer, each layer waiting for its own bucket (same parameters "
                        "bit for bit; not with --comm-hook powersgd, --clip-grad-norm nor --sync-bn)")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--weight-layout", default=None, choices=("input_major", "contiguous"),
                   help="memory layout of the sampled weights (default: input_major under torch DDP, "
                        "whose sparse hook then moves whole blocks; contiguous under Horovod, which needs it)")
    p.add_argument("--dist", default="torch", choices=("torch", "horovod"),
                   help="who reduces the gradients: torch.distributed DDP (torchrun, srun, mpirun) or Horovod "
                        "(horovodrun; --comm-hook allreduce, fp16 or sparse)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="default: nccl with CUDA, gloo otherwise")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a collective waits for the other ranks before the run fails naming the "
                        "ranks that stopped answering (default: $APPROXDIST_COLLECTIVE_TIMEOUT_S, else 1800)")
    p.add_argument("--output-dir", default=None, help="checkpoints, metrics.jsonl and TensorBoard events")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT_DIR/checkpoint.pt if present")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds a run (its checkpoint.pt and metrics.jsonl "
                        "are replaced); without it such a run is refused")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the sampling or optimizer settings (--sample-ratio, --budget, "
                        "--policy, --sample-mode, --minimal-k, --explore, --norm-stats, --norm-stats-every, --lr, "
                        "--momentum, "
                        "--weight-decay) differ from the checkpoint's: the new ones apply from the resume on")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: per epoch only)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate every N steps (0: at each epoch's end only); logged to metrics.jsonl as "
                        "kind 'eval' with train_seconds, the training time so far without evaluations and checkpoints")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, data order and sampling streams")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: no cap); "
                   "the learning-rate schedule still spans --epochs, so a capped run is a prefix of the full one")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (rank 0 shows one otherwise)")
    return p


def _check_finite(args):
    """Every float flag, present and future: nan or inf is never a setting (inf passes
    `> 0` and nan fails every comparison silently, so the range checks alone miss them)."""
    for action in build_parser()._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{action.option_strings[0]} must be a finite number, got {value}")


def check_output_dir(path):
    """The folder exists or can be made, and a file can be written in it: a run must not
    train for an epoch and then fail on its first checkpoint."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"--output-dir {path!r} is not writable: {exc.strerror or exc}") from None


def _at_least(minimum, flags):
    """ValueError naming the first of `flags` ({flag: value}) below `minimum`."""
    for flag, value in flags.items():
        if value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _check_recipe(args):
    """The torchvision training flags: ranges, and the combinations the run cannot do."""
    _at_least(1, {"--lr-step-size": args.lr_step_size, "--model-ema-steps": args.model_ema_steps})
    _at_least(0, {"--lr-warmup-epochs": args.lr_warmup_epochs, "--print-freq": args.print_freq,
                  "--mixup-alpha": args.mixup_alpha, "--cutmix-alpha": args.cutmix_alpha,
                  "--ra-magnitude": args.ra_magnitude})
    if args.lr_warmup_epochs >= args.epochs:
        raise ValueError(f"--lr-warmup-epochs must be < --epochs ({args.epochs}), got {args.lr_warmup_epochs}")
    if not 0.0 < args.lr_warmup_decay <= 1.0:
        raise ValueError(f"--lr-warmup-decay must be in (0, 1], got {args.lr_warmup_decay}")
    if not args.lr_gamma > 0:
        raise ValueError(f"--lr-gamma must be > 0, got {args.lr_gamma}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0.0 <= args.random_erase <= 1.0:
        raise ValueError(f"--random-erase must be in [0, 1], got {args.random_erase}")
    if not 0.0 <= args.model_ema_decay <= 1.0:
        raise ValueError(f"--model-ema-decay must be in [0, 1], got {args.model_ema_decay}")
    if args.clip_grad_norm is not None and not args.clip_grad_norm > 0:
        raise ValueError(f"--clip-grad-norm must be > 0, got {args.clip_grad_norm}")
    if args.norm_weight_decay is not None and args.norm_weight_decay < 0:
        raise ValueError(f"--norm-weight-decay must be >= 0, got {args.norm_weight_decay}")
    if not 1 <= args.augmix_severity <= 10:
        raise ValueError(f"--augmix-severity must be in [1, 10], got {args.augmix_severity}")
    if args.opt == "sgd_nesterov" and args.momentum == 0:
        raise ValueError("--opt sgd_nesterov needs --momentum > 0")
    for flag in ("train_crop_size", "val_resize_size", "val_crop_size"):
        value = getattr(args, flag)
        if value is not None and (value < 1 or args.dataset != "imagefolder"):
            name = "--" + flag.replace("_", "-")
            raise ValueError(f"{name} must be >= 1, got {value}" if value < 1 else
                             f"{name} sizes --dataset imagefolder's images, not --dataset {args.dataset}'s")
    in_hook = "--overlap-forward" if args.overlap_forward else "--step-in-hook"
    for key, why in REFUSED_IN_HOOK.items():
        if args.step_in_hook and getattr(args, key) not in (None, False):
            raise ValueError(f"{why}: drop {in_hook} or --{key.replace('_', '-')}")
    for key, why in REFUSED_OVERLAP.items():
        if args.overlap_forward and getattr(args, key) not in (None, False):
            raise ValueError(f"{why}: drop --overlap-forward or --{key.replace('_', '-')}")
    if args.dist == "horovod":
        for flag, on in (("--sync-bn", args.sync_bn), ("--clip-grad-norm", args.clip_grad_norm is not None)):
            if on:
                raise ValueError(f"{flag} is not available with --dist horovod (Horovod's optimizer reduces "
                                 "inside its step); use --dist torch")
    if args.sync_bn:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm synchronises GPU tensors only, and this "
                             "run is on the CPU (drop --sync-bn: each process then normalises its own batch)")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights!r}: no such file (a local state_dict; nothing is downloaded)")
    if args.test_only and args.weights is None and args.resume is None:
        raise ValueError("--test-only evaluates --weights FILE or --resume CHECKPOINT: give one of them")


def validate(args):
    """Raise ValueError naming the flag; cheap checks first, then the ones that touch disk.
    Resolves what the defaults leave open: --dataset from --data-path, --workers auto."""
    _check_finite(args)
    if args.dataset is None:
        args.dataset = detect_dataset(args.data_path) if args.data_path else "digits"
    args.workers = resolve_workers(args.workers, args.dataset)
    if not 0.0 < args.sample_ratio <= 1.0:
        raise ValueError(f"--sample-ratio must be in (0, 1], got {args.sample_ratio}")
    if args.budget is not None:
        if not 0.0 < args.budget <= 1.0:
            raise ValueError(f"--budget must be in (0, 1], got {args.budget}")
        if args.sample_ratio != 1.0:
            raise ValueError("--budget and --sample-ratio are alternatives: give one of them")
    if not 0.0 <= args.explore <= 1.0:
        raise ValueError(f"--explore must be in [0, 1], got {args.explore}")
    if args.policy == "bernoulli_weight" and (args.sample_ratio < 1.0 or args.budget is not None) \
            and not args.allow_unbiased_sampling:
        raise ValueError("--policy bernoulli_weight: its unbiased 1/p scaling (about 1/ratio on every kept "
                         "channel) made the digits CNN diverge at ratios 0.5 and 0.33 and lr 0.1, in both "
                         "--sample-mode weight_grad and forward (docs/design.md); use topk_weight or "
                         "topk_explore, or add --allow-unbiased-sampling")
    if args.norm_stats_every < 1:
        raise ValueError(f"--norm-stats-every must be >= 1, got {args.norm_stats_every}")
    _at_least(1, {"--epochs": args.epochs, "--batch-size": args.batch_size, "--minimal-k": args.minimal_k,
                  "--powersgd-rank": args.powersgd_rank})
    if args.powersgd_start_iter < 2:
        raise ValueError(f"--powersgd-start-iter must be >= 2 (DDP rebuilds buckets after step 1), got {args.powersgd_start_iter}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    _at_least(0, {"--momentum": args.momentum, "--weight-decay": args.weight_decay, "--max-steps": args.max_steps,
                  "--checkpoint-every": args.checkpoint_every, "--eval-every": args.eval_every})
    if not args.bucket_cap_mb > 0:
        raise ValueError(f"--bucket-cap-mb must be > 0, got {args.bucket_cap_mb}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    if args.checkpoint_every and not args.output_dir:
        raise ValueError("--checkpoint-every needs --output-dir")
    if args.resume == "auto" and not args.output_dir:
        raise ValueError("--resume auto needs --output-dir")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    collective_timeout(args.timeout)  # a bad APPROXDIST_COLLECTIVE_TIMEOUT_S fails here, named
    if args.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA, which is not available here (use --backend gloo)")
    if args.overlap_forward:
        if args.comm_hook == "powersgd":
            raise ValueError("--overlap-forward cannot run with --comm-hook powersgd (its second all-reduce "
                             "is issued from a callback); use --step-in-hook")
        args.step_in_hook = True  # the same in-hook step, deferred into the next forward
    if args.step_in_hook and args.dist == "horovod":
        raise ValueError("--step-in-hook and --overlap-forward need --dist torch (Horovod's optimizer "
                         "reduces and steps by itself)")
    if args.step_in_hook and args.amp:
        import torch

        if torch.cuda.is_available():  # the run's device: --amp on CUDA uses a GradScaler
            raise ValueError("--step-in-hook and --overlap-forward cannot run with --amp on CUDA: the GradScaler unscales and "
                             "checks the gradients before stepping, after the hook would have stepped")
    _check_recipe(args)
    if args.dist == "horovod":
        from .hvd import check_args

        check_args(args)
    check_model_name(args.model)
    if args.width is not None:
        if args.model not in BUILTIN:
            raise ValueError(f"--width sizes the built-in models ({', '.join(BUILTIN)}), not {args.model!r}")
        if args.width < 1:
            raise ValueError(f"--width must be >= 1, got {args.width}")
    check_data_path(args.dataset, args.data_path)
    if args.resume not in (None, "auto"):
        if not os.path.isfile(args.resume):
            raise ValueError(f"--resume {args.resume!r}: no such file")
    if args.output_dir:
        check_output_dir(args.output_dir)
    return args


def parse_args(argv=None):
    """Parse and validate; a bad flag exits with status 2 and one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def fail(message, status=2):
    print(f"approxdist-train: error: {message}", file=sys.stderr)
    raise SystemExit(status)


__all__ = ["COMM_HOOKS", "POLICIES", "AGREEMENTS", "REFUSED_IN_HOOK", "REFUSED_OVERLAP", "build_parser", "validate", "check_output_dir", "parse_args",
           "fail"]
