"""approxdist-plot: a figure of one's own approxdist-train runs (accuracy against training
time and against bytes sent), several runs overlaid. The fast tests write metrics.jsonl with
the app's own logger and the fields the app logs; the slow one plots two real 2-process runs."""
import json
import os
import subprocess
import sys

import pytest

from approxdist.train.logs import MetricsLogger
from approxdist.train.plot import PlotError, cli, collect, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(out_dir, hook, ratio, per_step_bytes, epochs=3, steps_per_epoch=10, eval_every=4):
    """A run's metrics.jsonl as approxdist-train writes it: an 'eval' record every
    eval_every steps (accuracy and clock) and an 'epoch' record at each epoch's end (with
    the cumulative payload). Returns the records written, in order."""
    log = MetricsLogger(str(out_dir))
    written = []
    for step in range(1, epochs * steps_per_epoch + 1):
        seconds = 0.5 * step + (0.1 if hook == "sparse" else 0.3) * step
        top1 = 100.0 * step / (step + 5 + 10 * (1 - ratio))
        if step % steps_per_epoch == 0:
            record = dict(epoch=step // steps_per_epoch, epochs=epochs, step=step, top1=top1, top5=min(100.0, 2 * top1),
                          train_seconds=seconds,
                          payload_bytes=None if per_step_bytes is None else per_step_bytes * steps_per_epoch,
                          payload_bytes_total=None if per_step_bytes is None else per_step_bytes * step,
                          dense_bytes=1000 * steps_per_epoch, sample_ratio=ratio, comm_hook=hook, world_size=2)
            log.epoch(dict(record, val_loss=1.0, train_loss=1.0, images_per_s=100.0))
            written.append(dict(record, kind="epoch"))
        elif step % eval_every == 0:
            record = dict(step=step, epoch=step / steps_per_epoch, top1=top1, top5=min(100.0, 2 * top1),
                          train_seconds=seconds, val_loss=1.0,
                          payload_bytes_total=None if per_step_bytes is None else per_step_bytes * step)
            log.evaluation(record)
            written.append(dict(record, kind="eval"))
    log.close()
    return written


def test_the_figure_draws_each_run_as_logged(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'approxdist[plots]')")
    runs = {"sparse": fake_run(tmp_path / "a", "sparse", 0.33, 330),
            "allreduce": fake_run(tmp_path / "b", "allreduce", 1.0, 1000)}
    fig = tmp_path / "fig.png"
    series = main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(fig)])
    assert fig.stat().st_size > 0
    with open(fig, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [s["label"] for s in series] == ["sparse, ratio 0.33", "allreduce, ratio 1"]
    for s, written in zip(series, runs.values()):
        assert s["steps"] == [r["step"] for r in written]           # every evaluation, epoch ends and mid-epoch
        assert s["seconds"] == [r["train_seconds"] for r in written]
        assert s["accuracy"] == [r["top1"] for r in written]
        assert s["bytes"] == [r["payload_bytes_total"] for r in written]  # mid-epoch evaluations too
        assert s["bytes_accuracy"] == [r["top1"] for r in written]
    assert f"wrote {fig}" in capsys.readouterr().out


def test_labels_metric_and_a_run_without_byte_counts(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'approxdist[plots]')")
    fake_run(tmp_path / "s1", "sparse", 0.5, 500)
    fake_run(tmp_path / "s2", "sparse", 0.5, 500)
    psgd = fake_run(tmp_path / "p", "powersgd", 1.0, None)
    series = main([str(tmp_path / d) for d in ("s1", "s2", "p")] + ["--metric", "top5", "-o", str(tmp_path / "f.svg")])
    # two runs with the same hook and ratio: told apart by their directory
    assert [s["label"] for s in series] == ["s1: sparse, ratio 0.5", "s2: sparse, ratio 0.5", "powersgd, ratio 1"]
    assert series[2]["accuracy"] == [r["top5"] for r in psgd] and series[2]["bytes"] == []
    assert "p: no byte counts" in capsys.readouterr().err
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    named = collect([str(tmp_path / "s1"), str(tmp_path / "p")], labels=["mine", "theirs"])
    assert [s["label"] for s in named] == ["mine", "theirs"]


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "RUN_DIR: no metrics.jsonl in"),
    (["{empty}"], "RUN_DIR: {empty}/metrics.jsonl holds no evaluated epoch yet"),
    (["{run}", "--labels", "a", "b"], "--labels: expected one label per RUN_DIR (1), got 2"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, message):
    fake_run(tmp_path / "run", "sparse", 0.5, 500, epochs=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 0, "kind": "start"}) + "\n")
    paths = {k: str(tmp_path / k) for k in ("missing", "empty", "run")}
    capsys.readouterr()
    assert cli([a.format(**paths) for a in args] + ["-o", str(tmp_path / "x.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(**paths) in lines[0], lines
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_one_line_says_how_to_install(tmp_path, monkeypatch):
    fake_run(tmp_path / "run", "sparse", 0.5, 500, epochs=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(PlotError, match=r"needs matplotlib: pip install 'approxdist\[plots\]'"):
        main([str(tmp_path / "run"), "-o", str(tmp_path / "x.png")])


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "(default: runs.png)" in out and "(default: top1)" in out


def test_module_entry_point(tmp_path):
    """`python -m approxdist.train.plot` runs the tool (the console script calls the same cli)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "approxdist.train.plot", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"approxdist-plot: error: RUN_DIR: no metrics.jsonl in {tmp_path / 'none'} "
        f"(expected an approxdist-train --output-dir)")


@pytest.mark.slow
def test_two_real_runs(tmp_path):
    """approxdist-train on digits, 2 processes, sparse at 0.5 and DDP's all-reduce, two epochs
    with --eval-every: the figure draws what their metrics.jsonl hold."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'approxdist[plots]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    dirs = []
    for hook, ratio in (("sparse", 0.5), ("allreduce", 1.0)):
        out = str(tmp_path / hook)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "approxdist.train", "--no-progress", "--dataset", "digits", "--model", "cnn", "--epochs", "2",
               "--batch-size", "64", "--eval-every", "5", "--comm-hook", hook, "--sample-ratio", str(ratio),
               "--output-dir", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        dirs.append(out)
    series = main(dirs + ["-o", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert [s["label"] for s in series] == ["sparse, ratio 0.5", "allreduce, ratio 1"]
    for s, out in zip(series, dirs):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        evaluated = sorted((r for r in records if r["kind"] in ("eval", "epoch")), key=lambda r: r["step"])
        epochs = [r for r in evaluated if r["kind"] == "epoch"]
        assert len(epochs) == 2 and len(evaluated) > 2
        assert s["seconds"] == [r["train_seconds"] for r in evaluated]
        assert s["accuracy"] == [r["top1"] for r in evaluated]
        assert s["bytes"] == [r["payload_bytes_total"] for r in evaluated] and s["bytes"][-1] > 0
        assert all(r["payload_bytes_total"] is not None for r in evaluated)  # --eval-every records count bytes
    sparse, dense = series
    # the same steps, about half the bytes (the first conv and the biases are sent whole)
    assert sparse["bytes_steps"] == dense["bytes_steps"]
    assert 0.4 * dense["bytes"][-1] < sparse["bytes"][-1] < 0.6 * dense["bytes"][-1]


def test_console_script_names_the_cli():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["approxdist-plot"] == "approxdist.train.plot:cli"
