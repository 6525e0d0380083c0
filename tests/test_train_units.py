"""approxdist-train pieces in one process: flags, sampler, data, models, checkpoints, logs."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from approxdist.train import checkpoint as ckpt
from approxdist.train.args import build_parser, validate
from approxdist.train.clock import TrainClock
from approxdist.train.data import ResumableDistributedSampler, build_datasets, check_data_path
from approxdist.train.logs import MetricsLogger, format_epoch_line, format_eval_line, human_bytes
from approxdist.train.models import SmallCNN, build_model
from approxdist.train.train import STRICT_CONFIG, Trainer


def _args(*flags):
    return build_parser().parse_args(list(flags))


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--sample-ratio", "0"], "--sample-ratio"),
        (["--sample-ratio", "1.5"], "--sample-ratio"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--minimal-k", "0"], "--minimal-k"),
        (["--lr", "0"], "--lr"),
        (["--workers", "-1"], "--workers"),
        (["--model", "no_such_net"], "--model"),
        (["--dataset", "imagefolder"], "--data-path"),
        (["--dataset", "cifar10", "--data-path", "/nonexistent"], "--data-path"),
        (["--checkpoint-every", "5"], "--output-dir"),
        (["--resume", "/nonexistent.pt"], "--resume"),
        (["--powersgd-start-iter", "1"], "--powersgd-start-iter"),
        (["--bucket-cap-mb", "0"], "--bucket-cap-mb"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--width", "0"], "--width"),
        (["--model", "resnet18", "--dataset", "fake", "--width", "64"], "--width"),
        (["--step-in-hook", "--dist", "horovod"], "--step-in-hook"),
        (["--overlap-forward", "--dist", "horovod"], "--overlap-forward"),
        (["--overlap-forward", "--comm-hook", "powersgd"], "--overlap-forward"),
        (["--budget", "0"], "--budget"),
        (["--budget", "0.33", "--sample-ratio", "0.5"], "--budget and --sample-ratio"),
        (["--explore", "1.5"], "--explore"),
        (["--norm-stats-every", "0"], "--norm-stats-every"),
        (["--policy", "bernoulli_weight", "--sample-ratio", "0.33"], "bernoulli_weight: its unbiased 1/p scaling"),
        (["--policy", "bernoulli_weight", "--budget", "0.5"], "--allow-unbiased-sampling"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--momentum", "nan"], "--momentum must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--bucket-cap-mb", "inf"], "--bucket-cap-mb must be a finite number"),
        (["--sample-ratio", "nan"], "--sample-ratio must be a finite number"),
        (["--momentum", "1.5"], r"--momentum must be in \[0, 1\)"),
    ],
)
def test_validate_names_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        validate(_args(*flags))


def test_validate_accepts_defaults_and_torchvision_names():
    validate(_args())
    validate(_args("--model", "resnet18", "--dataset", "fake", "--sample-ratio", "0.33"))
    validate(_args("--policy", "bernoulli_weight"))  # at ratio 1 it is the exact model
    validate(_args("--policy", "bernoulli_weight", "--sample-ratio", "0.33", "--allow-unbiased-sampling"))


def test_fidelity_flags_reach_convert_model():
    """--budget, --policy topk_explore --explore, --sample-mode, --norm-stats(-every) build
    the model that convert_model(...) with those arguments builds."""
    from approxdist.nn import WeightSampled, norm_stats_of
    from approxdist.train.data import DataInfo
    from approxdist.train.models import build_training_model

    info = DataInfo(10, 3, 32)
    model = build_training_model(_args("--model", "resnet18", "--dataset", "fake", "--budget", "0.33",
                                       "--comm-hook", "sparse", "--norm-stats-every", "3", "--sample-mode",
                                       "forward"), info)
    ratios = {m.sample_ratio for m in model.modules() if isinstance(m, WeightSampled)}
    assert 1.0 in ratios and min(ratios) < 0.33  # per-layer ratios
    assert {m.mode for m in model.modules() if isinstance(m, WeightSampled)} == {"forward"}
    assert norm_stats_of(model).every == 3
    # the default mode's training forward is exact: no statistics pass to attach
    model = build_training_model(_args("--model", "resnet18", "--dataset", "fake", "--sample-ratio", "0.5"), info)
    assert {m.mode for m in model.modules() if isinstance(m, WeightSampled)} == {"weight_grad"}
    assert norm_stats_of(model) is None
    model = build_training_model(_args("--model", "resnet18", "--dataset", "fake", "--sample-ratio", "0.5",
                                       "--policy", "topk_explore", "--explore", "0.1", "--norm-stats", "sampled"),
                                 info)
    assert {(m.policy, m.explore) for m in model.modules() if isinstance(m, WeightSampled)} == {("topk_explore", 0.1)}
    assert norm_stats_of(model) is None


def test_sampler_shards_are_disjoint_equal_and_resumable():
    n, world, bs = 103, 2, 8
    shards = [ResumableDistributedSampler(n, world, r, bs, seed=3) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    orders = [list(s) for s in shards]
    assert len(orders[0]) == len(orders[1]) == shards[0].batches_per_epoch * bs == 48
    assert not set(orders[0]) & set(orders[1])
    # Same epoch, same order; another epoch, another order.
    shards[0].set_epoch(4)
    assert list(shards[0]) == orders[0]
    shards[0].set_epoch(5)
    assert list(shards[0]) != orders[0]
    # Starting at batch 2 gives exactly the suffix of the full epoch.
    shards[0].set_epoch(4, start_batch=2)
    assert list(shards[0]) == orders[0][2 * bs:]
    assert len(shards[0]) == len(orders[0]) - 2 * bs
    with pytest.raises(ValueError, match="batch-size"):
        ResumableDistributedSampler(10, 2, 0, 8)


def test_digits_split_is_fixed_and_disjoint():
    train, val, info = build_datasets("digits")
    assert (len(train), len(val)) == (1437, 360)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    train2, _, _ = build_datasets("digits")
    assert torch.equal(train.tensors[0], train2.tensors[0])
    flat_t = {tuple(x.flatten().tolist()) for x in train.tensors[0]}
    overlap = sum(tuple(x.flatten().tolist()) in flat_t for x in val.tensors[0])
    assert overlap < 5  # the digits set has a handful of duplicate images, nothing more


def test_fake_data_is_deterministic():
    a, _, info = build_datasets("fake", image_size=16)
    b, _, _ = build_datasets("fake", image_size=16)
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape[1:] == (3, 16, 16)
    assert info.num_classes == 10


def test_cifar10_reads_python_batches_and_never_downloads(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    train, val, info = build_datasets("cifar10", str(tmp_path))
    assert (len(train), len(val), info.num_classes) == (20, 3, 10)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10
    assert train[0][0].shape == (3, 32, 32)
    os.unlink(root / "test_batch")
    with pytest.raises(ValueError, match="never downloads"):
        check_data_path("cifar10", str(tmp_path))


def test_models_by_name():
    assert isinstance(build_model("cnn", num_classes=10, in_channels=1, image_size=8), SmallCNN)
    assert build_model("cnn", num_classes=10, in_channels=1)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert build_model("mlp", num_classes=7, in_channels=3, image_size=4)(torch.zeros(2, 3, 4, 4)).shape == (2, 7)
    net = build_model("resnet18", num_classes=5)
    assert net.fc.out_features == 5
    with pytest.raises(ValueError, match="--model"):
        build_model("resnet_nope", num_classes=10)
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", num_classes=10, in_channels=1)


def test_width_sizes_the_built_in_models():
    def count(net):
        return sum(p.numel() for p in net.parameters())

    # SmallCNN: 1 -> w -> 2w -> 2w channels of 3x3, then a head on 2w x 4 x 4 features
    for w in (32, 128):
        cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8, width=w)
        assert count(cnn) == (9 * w + w) + (9 * w * 2 * w + 2 * w) + (9 * 4 * w * w + 2 * w) \
            + (2 * w * 16 * 10 + 10)
        assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert count(build_model("cnn", num_classes=10, in_channels=1)) == count(SmallCNN(1, 10, 32))
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8, width=512)
    assert count(mlp) == (64 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert _args().width is None  # the built-ins' own defaults
    for bad in (0, -3):
        with pytest.raises(ValueError, match="width"):
            build_model("cnn", num_classes=10, in_channels=1, width=bad)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", num_classes=10, width=64)


# -- checkpoints -----------------------------------------------------------------------

class _NoComm:
    def state_dict(self):
        return {}

    def load_state_dict(self, data):
        pass


def _trainer(model, config=None):
    args = _args("--output-dir", "unused")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    config = config or {"model": "cnn", "dataset": "digits", "num_classes": 10, "world_size": 1, "batch_size": 32,
                        "seed": 0}
    return Trainer(args, model, opt, sched, config=config, comm=_NoComm())


def _step(trainer):
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(trainer.model(x), y).backward()
    trainer.optimizer.step()
    trainer.scheduler.step()


def _snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {i: {n: t.clone() for n, t in trainer.optimizer.state[p].items()}
             for i, p in enumerate(trainer.model.parameters()) if p in trainer.optimizer.state},
            trainer.scheduler.state_dict()["last_epoch"])


def _same(a, b):
    return (all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[2] == b[2] and a[1].keys() == b[1].keys()
            and all(torch.equal(a[1][p][n], b[1][p][n]) for p in a[1] for n in a[1][p]))


def test_checkpoint_round_trip_is_exact_and_weights_only(tmp_path):
    torch.manual_seed(0)
    t = _trainer(SmallCNN())
    _step(t)
    t.clock = TrainClock(12.5)
    path = tmp_path / "c.pt"
    ckpt.save_atomic(t.checkpoint_payload(1, 7, 3), str(path))
    raw = torch.load(path, weights_only=True)  # must not need unpickling of arbitrary objects
    assert raw["format"] == ckpt.FORMAT and (raw["epoch"], raw["step"], raw["step_in_epoch"]) == (1, 7, 3)
    assert raw["train_seconds"] == 12.5
    saved = _snapshot(t)
    torch.manual_seed(1)
    t2 = _trainer(SmallCNN())
    _step(t2)
    assert not _same(_snapshot(t2), saved)
    assert t2.load(str(path), str(path)) == (1, 7, 3)
    assert _same(_snapshot(t2), saved)
    assert t2.clock.seconds == 12.5 and not t2.clock.running  # the training clock goes on from there
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    del raw["train_seconds"]  # a checkpoint written before the training clock
    ckpt.save_atomic(raw, str(path))
    assert t2.load(str(path), str(path)) == (1, 7, 3) and t2.clock.seconds == 0.0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_checkpoint_is_a_clear_error_and_loads_nothing(tmp_path, damage):
    torch.manual_seed(0)
    t = _trainer(SmallCNN())
    _step(t)
    path = tmp_path / "c.pt"
    ckpt.save_atomic(t.checkpoint_payload(0, 1, 1), str(path))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    t2 = _trainer(SmallCNN())
    before = _snapshot(t2)
    with pytest.raises(ckpt.CheckpointError, match="c.pt"):
        t2.load(str(path), str(path))
    assert _same(_snapshot(t2), before)


def test_mismatched_checkpoint_is_rejected_before_loading(tmp_path):
    torch.manual_seed(0)
    t = _trainer(SmallCNN(width=16))
    _step(t)
    path = tmp_path / "c.pt"
    ckpt.save_atomic(t.checkpoint_payload(0, 1, 1), str(path))
    # Same keys, other shapes: nothing may be copied, not even the tensors that would fit.
    other = _trainer(SmallCNN(width=32))
    _step(other)
    before = _snapshot(other)
    with pytest.raises(ckpt.CheckpointError, match="shape mismatch"):
        other.load(str(path), str(path))
    assert _same(_snapshot(other), before)
    # Another model or data set altogether.
    for key in STRICT_CONFIG:
        config = dict(t.config, **{key: "something else"})
        with pytest.raises(ckpt.CheckpointError, match=key):
            _trainer(SmallCNN(width=16), config).load(str(path), str(path))
    # A mid-epoch checkpoint cannot continue with another seed (the data order differs).
    with pytest.raises(ckpt.CheckpointError, match="seed"):
        _trainer(SmallCNN(width=16), dict(t.config, seed=4)).load(str(path), str(path))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "v": torch.ones(2)}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"format": ckpt.FORMAT, "v": torch.zeros(2)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]
    with pytest.raises(TypeError, match="weights_only"):
        ckpt.save_atomic({"bad": object()}, str(path))


def test_logs_line_and_jsonl(tmp_path):
    m = {"epoch": 2, "epochs": 5, "step": 44, "train_loss": 0.5, "val_loss": 0.4, "top1": 91.0, "top5": 99.5,
         "images_per_s": 1234.0, "payload_bytes": 500, "dense_bytes": 1000}
    line = format_epoch_line(m)
    assert "top1 91.00" in line and "saved 500 B (50.0% of dense)" in line and "\n" not in line
    assert "sent n/a" in format_epoch_line(dict(m, payload_bytes=None))
    assert human_bytes(2_500_000) == "2.50 MB"
    log = MetricsLogger(str(tmp_path))
    log.epoch(m)
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["top1"] == 91.0 and rec["kind"] == "epoch"
    silent = MetricsLogger(str(tmp_path / "other"), enabled=False)
    silent.epoch(m)
    assert not (tmp_path / "other").exists()


def test_eval_records_and_lines(tmp_path):
    m = {"step": 30, "epoch": 1.5, "val_loss": 0.25, "top1": 95.5, "top5": 100.0, "val_samples": 360,
         "train_seconds": 12.34}
    line = format_eval_line(m)
    assert "step 30" in line and "epoch 1.50" in line and "top1 95.50" in line and "train 12.3 s" in line
    shown = []
    log = MetricsLogger(str(tmp_path))
    log.evaluation(m, echo=shown.append)  # approxdist-train passes tqdm's write when a bar is up
    log.close()
    assert shown == [line]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["kind"] == "eval" and rec["top1"] == 95.5 and rec["train_seconds"] == 12.34
    MetricsLogger(str(tmp_path / "other"), enabled=False).evaluation(m, echo=shown.append)
    assert len(shown) == 1 and not (tmp_path / "other").exists()


def test_train_clock_counts_only_what_runs_outside_pauses():
    now = [100.0]
    clock = TrainClock(now=lambda: now[0])
    assert clock.seconds == 0.0 and not clock.running
    clock.start()
    now[0] += 2.0
    assert clock.seconds == 2.0
    with clock.paused():  # an evaluation
        now[0] += 5.0
        assert clock.seconds == 2.0 and not clock.running
    assert clock.running
    now[0] += 1.0
    clock.start()  # starting a running clock changes nothing
    now[0] += 1.0
    clock.stop()
    now[0] += 7.0  # between epochs: stopped
    with clock.paused():  # a checkpoint while stopped leaves it stopped
        now[0] += 1.0
    assert clock.seconds == 4.0 and not clock.running
    resumed = TrainClock(4.0, now=lambda: now[0])  # from a checkpoint
    resumed.start()
    now[0] += 0.5
    assert resumed.seconds == 4.5
    with pytest.raises(ValueError, match="seconds"):
        TrainClock(-1.0)


def test_imagefolder_layout(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 24), (i * 90, 40, 200)).save(folder / f"{i}.png")
    train, val, info = build_datasets("imagefolder", str(tmp_path), image_size=16)
    assert (len(train), len(val), info.num_classes, info.in_channels) == (4, 4, 2, 3)
    assert train[0][0].shape == (3, 16, 16) and val[3][1] == 1
    (tmp_path / "val" / "cat" / "0.png").unlink()
    os.rename(tmp_path / "val", tmp_path / "valid")
    with pytest.raises(ValueError, match="val/"):
        check_data_path("imagefolder", str(tmp_path))


def test_powersgd_state_round_trips_weights_only(tmp_path):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from approxdist.train.comm import Comm, _Counting

    def make():
        return Comm("powersgd", _Counting(psgd.PowerSGDState(None, start_powerSGD_iter=2), None), "powersgd")

    a = make()
    a.state.inner.iter, a.state.steps, a.state.dense_bytes = 17, 16, 4096
    a.state.inner.rng.standard_normal(5)  # move the generator off its seed
    ckpt.save_atomic({"comm": a.state_dict()}, str(tmp_path / "c.pt"))
    b = make()
    b.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["comm"])
    assert (b.state.inner.iter, b.stats()) == (17, {"steps": 16, "payload_bytes": None, "dense_bytes": 4096})
    assert np.array_equal(a.state.inner.rng.standard_normal(3), b.state.inner.rng.standard_normal(3))
