"""approxdist-train's torchvision flags, each checked for its effect: the optimizer and its
groups, the schedule and warm-up, label smoothing, MixUp/CutMix, clipping, the EMA,
channels_last, --test-only and --weights, the data set that follows --data-path, args.json,
and what a resume keeps of them. One process, the real command line (`cli`) on digits."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from approxdist.train.__main__ import cli
from approxdist.train.args import build_parser, validate
from approxdist.train.augment import batch_mixer
from approxdist.train.data import Augment, build_datasets
from approxdist.train.loop import Recipe, evaluate, train_one_epoch
from approxdist.train.models import build_plain_model, build_training_model
from approxdist.train.optim import build_optimizer, parameter_groups
from approxdist.train.schedule import StepSchedule

RUN = ["--model", "mlp", "--dataset", "digits", "--batch-size", "64", "--no-progress"]
SPE = 1437 // 64  # steps per epoch of RUN


pytestmark = pytest.mark.usefixtures("single_process")  # tests/conftest.py


def _args(*flags):
    return build_parser().parse_args(list(flags))


def _cli(*flags, callbacks=(), run=RUN):
    try:
        return cli([*run, *flags], callbacks=callbacks)
    except SystemExit as exc:
        return exc.code


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("approxdist-train: error:"), err
    return err[0]


def _epochs(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "epoch"]


# -- --help, aliases, defaults -----------------------------------------------------------------
def test_help_shows_every_default_and_the_in_hook_refusals():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert "default" in formatter._get_help_string(action), action.option_strings
    text = " ".join(parser.format_help().split())
    assert "(default: sgd)" in text and "(default: cosineannealinglr)" in text and "(default: auto)" in text
    assert "--clip-grad-norm" in text and "Refused with --step-in-hook and --overlap-forward" in text


def test_aliases_and_todays_defaults():
    a = _args("-b", "7", "-j", "3", "--wd", "0.5")
    assert (a.batch_size, a.workers, a.weight_decay) == (7, "3", 0.5)
    validate(a)
    assert a.workers == 3
    d = validate(_args())
    assert (d.dataset, d.workers, d.opt, d.lr_scheduler, d.lr_warmup_epochs) == ("digits", 0, "sgd",
                                                                                 "cosineannealinglr", 0)
    # the defaults give today's optimizer and schedule: SGD and a per-step cosine over the run
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, d)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.1, 0.9, 1e-4, False)
    sched = StepSchedule(opt, total_steps=50, steps_per_epoch=5)
    ref_opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=50)
    for _ in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()


def test_optimizers_are_torchvisions():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    nest = build_optimizer(model, _args("--opt", "sgd_nesterov"))
    assert type(nest) is torch.optim.SGD and nest.param_groups[0]["nesterov"]
    rms = build_optimizer(model, _args("--opt", "RMSprop", "--momentum", "0.8"))
    assert type(rms) is torch.optim.RMSprop
    assert (rms.param_groups[0]["eps"], rms.param_groups[0]["alpha"], rms.param_groups[0]["momentum"]) == (
        0.0316, 0.9, 0.8)
    adamw = build_optimizer(model, _args("--opt", "adamw", "--wd", "0.05"))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05


def test_norm_weight_decay_puts_norm_parameters_in_their_own_group():
    model = build_plain_model(_args("--model", "resnet18"), build_datasets("fake", image_size=8)[2])
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    groups = parameter_groups(model, 1e-4, 0.0)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == norms
    assert not {id(p) for p in groups[0]["params"]} & norms
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(model, 1e-4)) == 1
    # its effect in a step: with zero gradients only the decay moves a parameter
    opt = build_optimizer(model, _args("--norm-weight-decay", "0", "--momentum", "0", "--wd", "0.1"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (id(p) in norms), n


# -- schedule --------------------------------------------------------------------------------
def _lrs(flags, steps):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    a = _args(*flags)
    sched = StepSchedule(opt, kind=a.lr_scheduler, total_steps=steps, steps_per_epoch=4, step_size=a.lr_step_size,
                         gamma=a.lr_gamma, warmup_epochs=a.lr_warmup_epochs, warmup_method=a.lr_warmup_method,
                         warmup_decay=a.lr_warmup_decay)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_and_schedulers_give_torchvisions_rates():
    lin = _lrs(["--lr-warmup-epochs", "2", "--lr-warmup-method", "linear", "--lr-warmup-decay", "0.2"], 40)
    assert lin[:8] == pytest.approx([0.2 + 0.8 * s / 8 for s in range(8)])
    assert lin[8:] == pytest.approx([(1 + math.cos(math.pi * t / 32)) / 2 for t in range(32)])
    const = _lrs(["--lr-warmup-epochs", "1"], 12)
    assert const[:4] == [0.01] * 4 and const[4] == 1.0
    step = _lrs(["--lr-scheduler", "steplr", "--lr-step-size", "2", "--lr-gamma", "0.5"], 24)
    assert step == pytest.approx([0.5 ** (s // 8) for s in range(24)])
    exp = _lrs(["--lr-scheduler", "exponentiallr", "--lr-gamma", "0.9", "--lr-warmup-epochs", "1"], 16)
    assert exp == pytest.approx([0.01] * 4 + [0.9 ** ((s - 4) // 4) for s in range(4, 16)])


def _lr_recorder(lrs):
    def callback(trainer, step):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return callback


def test_resume_keeps_the_warmup_position_and_the_ema(tmp_path):
    """A run stopped inside its warm-up and resumed goes on at the same rates, with the same
    EMA and the same MixUp/CutMix, as one that never stopped; the new flags are in the
    checkpoint's config."""
    flags = ["--epochs", "2", "--lr-warmup-epochs", "1", "--lr-warmup-method", "linear", "--model-ema",
             "--model-ema-steps", "3", "--model-ema-decay", "0.999", "--label-smoothing", "0.1",
             "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    full, part = [], []
    assert _cli(*flags, "--output-dir", str(tmp_path / "a"), callbacks=[_lr_recorder(full)]) == 0
    b = str(tmp_path / "b")
    assert _cli(*flags, "--output-dir", b, "--max-steps", "10", "--checkpoint-every", "5",
                callbacks=[_lr_recorder(part)]) == 0
    saved = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    assert saved["config"]["lr_warmup_epochs"] == 1 and saved["config"]["label_smoothing"] == 0.1
    assert saved["model_ema"]["updates"] == 0  # every update in the warm-up copies
    assert _cli(*flags, "--output-dir", b, "--resume", "auto", callbacks=[_lr_recorder(part)]) == 0
    assert part == full and len(full) == 2 * SPE
    assert full[:SPE] == pytest.approx([0.001 + 0.099 * s / SPE for s in range(1, SPE + 1)])
    a_ck = torch.load(os.path.join(tmp_path / "a", "checkpoint.pt"), weights_only=True)
    b_ck = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    for k, v in a_ck["model_ema"]["module"].items():
        assert torch.equal(v, b_ck["model_ema"]["module"][k]), k
    for k, v in a_ck["model"].items():  # the mixes too: each a function of (seed, step)
        assert torch.equal(v, b_ck["model"][k]), k
    rec = _epochs(str(tmp_path / "a"))[-1]
    assert 0 <= rec["ema_top1"] <= 100 and rec["ema_val_loss"] != rec["val_loss"]


def test_ema_is_the_documented_average():
    """Every --model-ema-steps steps ema = d * ema + (1 - d) * model (the first update a copy),
    d = 1 - min(1, (1 - decay) * world * batch * steps / epochs) as torchvision adjusts it."""
    states, end = [], []

    def watch(trainer, step):
        if step % 2 == 0:
            states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        if step == 8:
            end.append((trainer.ema.decay, {k: v.clone() for k, v in trainer.ema.module.state_dict().items()},
                        {k: v.clone() for k, v in trainer.model.state_dict().items()}))

    assert _cli("--epochs", "1", "--max-steps", "8", "--model-ema", "--model-ema-steps", "2",
                "--model-ema-decay", "0.999", callbacks=[watch]) == 0
    (decay, ema, model), = end
    assert decay == pytest.approx(1 - 0.001 * 64 * 2 / 1)
    without = []
    assert _cli("--epochs", "1", "--max-steps", "8",
                callbacks=[lambda t, s: s == 8 and without.append(t.model.state_dict())]) == 0
    assert all(torch.equal(v, without[0][k]) for k, v in model.items())  # the EMA changes no parameter
    expected = dict(states[0])
    for state in states[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in state.items()}
    assert len(states) == 4
    for k, v in ema.items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not torch.allclose(v, model[k], atol=1e-4), k


def test_resume_with_other_recipe_flags_is_refused(tmp_path, capsys):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--max-steps", "2", "--output-dir", out) == 0
    capsys.readouterr()
    assert _cli("--epochs", "1", "--output-dir", out, "--resume", "auto", "--label-smoothing", "0.1") == 2
    assert "label_smoothing=0.0 (now 0.1)" in _one_error_line(capsys)
    assert _cli("--epochs", "1", "--output-dir", out, "--resume", "auto", "--opt", "adamw",
                "--allow-config-change") == 2
    assert "opt='sgd' (now 'adamw')" in _one_error_line(capsys)


def test_allowed_schedule_change_applies_from_the_resume(tmp_path, capsys):
    out, lrs = str(tmp_path), []
    assert _cli("--epochs", "2", "--max-steps", "2", "--output-dir", out) == 0
    capsys.readouterr()
    assert _cli("--epochs", "2", "--output-dir", out, "--resume", "auto", "--lr-scheduler", "steplr",
                "--lr-step-size", "1", "--lr-gamma", "0.5", "--allow-config-change", callbacks=[_lr_recorder(lrs)]) == 0
    assert "this run's steplr over 2 epoch(s)" in capsys.readouterr().out  # placed at step 2 at once
    assert lrs == pytest.approx([0.1 * 0.5 ** (s // SPE) for s in range(3, 2 * SPE + 1)])


# -- what a step does ---------------------------------------------------------------------------
class _Recording(torch.optim.SGD):
    """SGD that records the gradients' total norm when it steps."""

    norms: list

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return super().step(closure)


def _one_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=n)


def _epoch(model, loader, recipe, lr=0.0):
    opt = _Recording(model.parameters(), lr=lr)
    opt.norms = []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_one_epoch(model, loader, opt, sched, None, device=torch.device("cpu"), recipe=recipe)
    return out["loss_sum"] / out["samples"], opt.norms


def test_label_smoothing_is_crossentropys():
    torch.manual_seed(0)
    model = build_plain_model(_args(), build_datasets("digits")[2])
    x, y, loader = _one_batch()
    for ls in (0.0, 0.25):
        loss, _ = _epoch(model, loader, Recipe(label_smoothing=ls))
        assert loss == pytest.approx(torch.nn.CrossEntropyLoss(label_smoothing=ls)(model(x), y).item(), rel=1e-6)
    assert _epoch(model, loader, Recipe(label_smoothing=0.25))[0] != _epoch(model, loader, Recipe())[0]


def test_clip_grad_norm_bounds_the_norm_the_optimizer_sees():
    torch.manual_seed(0)
    model = build_plain_model(_args("--model", "cnn"), build_datasets("digits")[2])
    _, _, loader = _one_batch()
    _, (free,) = _epoch(model, loader, Recipe())
    _, (clipped,) = _epoch(model, loader, Recipe(clip_grad_norm=free / 10))
    assert free > 0 and clipped == pytest.approx(free / 10, rel=1e-5)
    _, (loose,) = _epoch(model, loader, Recipe(clip_grad_norm=free * 10))
    assert loose == pytest.approx(free, rel=1e-6)


@pytest.mark.parametrize("flags", [["--mixup-alpha", "0.4"], ["--cutmix-alpha", "1.0"],
                                   ["--mixup-alpha", "0.4", "--cutmix-alpha", "1.0"]])
def test_mixup_cutmix_mix_images_and_targets(flags):
    a = _args(*flags)
    mixer = batch_mixer(a.mixup_alpha, a.cutmix_alpha, 10)
    x, y, loader = _one_batch()
    mixed = []

    def recording(images, target):
        mixed.append(mixer(images, target))
        return mixed[-1]

    torch.manual_seed(0)
    model = build_plain_model(_args(), build_datasets("digits")[2])
    torch.manual_seed(3)
    loss, _ = _epoch(model, loader, Recipe(mixer=recording))
    (mx, my), = mixed
    assert my.shape == (16, 10) and torch.allclose(my.sum(1), torch.ones(16))
    assert not torch.equal(my, F.one_hot(y, 10).float()) and not torch.equal(mx, x)
    # the loop trains on the mixed batch against the soft targets
    assert loss == pytest.approx(F.cross_entropy(model(mx), my).item(), rel=1e-6)
    assert batch_mixer(0.0, 0.0, 10) is None


def test_channels_last_model_and_inputs():
    info = build_datasets("fake", image_size=8)[2]
    model = build_training_model(_args("--model", "resnet18", "--channels-last"), info)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs)
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))), batch_size=4)
    _epoch(model, loader, Recipe(channels_last=True))
    evaluate(model, loader, torch.device("cpu"), channels_last=True)
    assert len(seen) == 2 and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                                  for x in seen)
    plain = build_training_model(_args("--model", "resnet18"), info)
    assert plain.conv1.weight.is_contiguous()


def test_sync_bn_converts_and_is_refused_on_cpu(capsys):
    info = build_datasets("fake", image_size=8)[2]
    args = _args("--model", "resnet18", "--sync-bn")
    model = build_training_model(args, info)  # what a CUDA run gets (validate refuses it here)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    if torch.cuda.is_available():
        pytest.skip("CUDA here: --sync-bn is accepted")
    assert _cli("--sync-bn") == 2
    line = _one_error_line(capsys)
    assert "--sync-bn needs CUDA" in line


@pytest.mark.parametrize("flags, needle", [
    (["--clip-grad-norm", "1", "--step-in-hook"], "drop --step-in-hook or --clip-grad-norm"),
    (["--clip-grad-norm", "1", "--overlap-forward"], "drop --overlap-forward or --clip-grad-norm"),
    (["--sync-bn", "--overlap-forward"], "drop --overlap-forward or --sync-bn"),
    (["--lr-warmup-epochs", "10"], "--lr-warmup-epochs must be < --epochs"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--random-erase", "2"], "--random-erase"),
    (["--auto-augment", "ta_wide"], "--auto-augment transforms 8-bit images"),
    (["--train-crop-size", "16"], "--train-crop-size sizes --dataset imagefolder"),
    (["--weights", "/nonexistent.pt"], "nothing is downloaded"),
    (["--test-only"], "--test-only evaluates --weights FILE or --resume"),
    (["--workers", "many"], "--workers must be 'auto' or a number"),
    (["--dataset", "digits", "--data-path", "/tmp"], "--data-path is not read by --dataset digits"),
    (["--data-path", "/proc/self"], "neither an ImageFolder tree"),
])
def test_refusals_are_one_line(capsys, flags, needle):
    assert _cli(*flags, run=["--no-progress"]) == 2
    assert needle in _one_error_line(capsys)


# -- data -----------------------------------------------------------------------------------------
def _imagefolder(root, size=(20, 24)):
    from PIL import Image

    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", size, (i * 60, 40 + 100 * c, 200)).save(folder / f"{i}.png")


def test_data_path_picks_the_data_set_and_sizes(tmp_path):
    _imagefolder(tmp_path)
    a = validate(_args("--data-path", str(tmp_path), "--val-resize-size", "20", "--val-crop-size", "10",
                       "--train-crop-size", "12"))
    assert a.dataset == "imagefolder" and a.workers >= 1  # decoding never in the training process
    train, val, info = build_datasets(a.dataset, a.data_path, a.image_size, Augment.from_args(a))
    assert train[0][0].shape == (3, 12, 12) and val[0][0].shape == (3, 10, 10) and info.image_size == 12
    torch.manual_seed(0)
    plain = train[0][0]
    a = validate(_args("--data-path", str(tmp_path), "--train-crop-size", "12", "--auto-augment", "ta_wide",
                       "--random-erase", "1.0"))
    train, _, _ = build_datasets(a.dataset, a.data_path, a.image_size, Augment.from_args(a))
    assert "TrivialAugmentWide" in repr(train.transform) and "RandomErasing" in repr(train.transform)
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], plain)


def test_workers_auto_follows_the_data_set_and_the_cpus_per_process(monkeypatch, tmp_path):
    _imagefolder(tmp_path)
    cpus = len(os.sched_getaffinity(0))
    assert validate(_args("--dataset", "fake")).workers == 0
    assert validate(_args("--data-path", str(tmp_path))).workers == max(1, min(8, cpus))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cpus))  # more processes than CPUs: still one each
    assert validate(_args("--data-path", str(tmp_path))).workers == 1
    assert validate(_args("--data-path", str(tmp_path), "-j", "0")).workers == 0


def test_random_erase_on_tensor_data():
    base, _, _ = build_datasets("digits")
    erased, _, _ = build_datasets("digits", augment=Augment(random_erase=1.0))
    x, y = erased[5]
    assert y == base[5][1] and (x == 0).any() and not torch.equal(x, base[5][0])
    assert torch.equal(x[x != 0], base[5][0][x != 0])  # only an erased rectangle of zeros differs


def test_auto_augment_on_cifar_batches(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    a = validate(_args("--data-path", str(tmp_path), "--auto-augment", "imagenet"))
    assert a.dataset == "cifar10"
    plain, _, _ = build_datasets("cifar10", str(tmp_path))
    augmented, val, _ = build_datasets("cifar10", str(tmp_path), augment=Augment.from_args(a))
    assert "AutoAugment" in repr(augmented.policy) and val.policy is None
    torch.manual_seed(0)
    x = [plain[i][0] for i in range(10)]
    torch.manual_seed(0)
    y = [augmented[i][0] for i in range(10)]
    assert any(not torch.equal(p, q) for p, q in zip(x, y))


# -- weights, test-only, args.json, print-freq ---------------------------------------------------------
def test_test_only_reports_the_loaded_weights_and_writes_nothing(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _cli("--epochs", "1", "--model-ema", "--model-ema-steps", "2", "--output-dir", run) == 0
    rec = _epochs(run)[-1]
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["dataset"] == "digits" and args["model_ema"] is True and args["workers"] == 0
    capsys.readouterr()
    empty = tmp_path / "empty"
    assert _cli("--test-only", "--resume", os.path.join(run, "checkpoint.pt"), "--output-dir", str(empty)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test-only:") and f"top1 {rec['top1']:.2f}" in line
    assert f"EMA top1 {rec['ema_top1']:.2f}" in line
    assert os.listdir(empty) == []  # no checkpoint, no metrics, no args
    # --weights: a plain state_dict file of those weights gives the same accuracy
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["model"]
    torch.save(state, tmp_path / "w.pt")
    assert _cli("--test-only", "--weights", str(tmp_path / "w.pt")) == 0
    assert f"top1 {rec['top1']:.2f}" in capsys.readouterr().out
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert _cli("--test-only", "--weights", str(tmp_path / "other.pt")) == 2
    assert "does not fit this model" in _one_error_line(capsys)


def test_weights_start_the_run_and_print_freq_prints(tmp_path, capsys):
    torch.manual_seed(5)
    model = build_plain_model(_args(*RUN), build_datasets("digits")[2])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    seen = []

    def first(trainer, step):
        if step == 1:
            seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    assert _cli("--epochs", "1", "--max-steps", "6", "--weights", str(tmp_path / "w.pt"), "--lr", "1e-9",
                "--print-freq", "3", callbacks=[first]) == 0
    assert all(torch.allclose(seen[0][k], v, atol=1e-6) for k, v in model.state_dict().items())
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1 step ")]
    assert [x.split()[3] for x in lines] == ["3", "6"] and all(" lr " in x for x in lines)


@pytest.mark.slow
def test_recipe_under_the_in_hook_step_and_forward_overlap(tmp_path):
    """AdamW, steplr, smoothing, MixUp and the EMA under torchrun (2 gloo ranks, the
    sparse hook): --step-in-hook and --overlap-forward train the same model and EMA, bit for
    bit, as the usual loop."""
    from test_train_dist import _checkpoint, torchrun

    common = ["--dataset", "digits", "--model", "cnn", "--epochs", "2", "--max-steps", "6", "--batch-size", "16",
              "--comm-hook", "sparse", "--sample-ratio", "0.5", "--bucket-cap-mb", "0.01", "--opt", "adamw",
              "--lr", "0.01", "--lr-scheduler", "steplr", "--lr-step-size", "1", "--label-smoothing", "0.1",
              "--mixup-alpha", "0.2", "--model-ema", "--model-ema-steps", "2", "--model-ema-decay", "0.999"]
    ckpts = []
    for i, flag in enumerate(([], ["--step-in-hook"], ["--overlap-forward"])):
        out = str(tmp_path / str(i))
        torchrun(common + ["--output-dir", out, *flag])
        ckpts.append(_checkpoint(out))
    usual = ckpts[0]
    assert usual["model_ema"]["updates"] == 3  # steps 2 (a copy), 4 and 6
    assert any(not torch.equal(v, usual["model"][k]) for k, v in usual["model_ema"]["module"].items())
    for other in ckpts[1:]:
        for key, value in usual["model"].items():
            assert torch.equal(value, other["model"][key]), key
        for key, value in usual["model_ema"]["module"].items():
            assert torch.equal(value, other["model_ema"]["module"][key]), key
        for pid, state in usual["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg"], other["optimizer"]["state"][pid]["exp_avg"])
