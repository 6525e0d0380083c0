"""approxdist-plot: the accuracy of one's own approxdist-train runs against training time and
against the bytes the gradient reduction sent, several runs overlaid.

    approxdist-plot RUN_DIR [RUN_DIR ...] -o fig.png     (or python -m approxdist.train.plot)

A RUN_DIR is an approxdist-train --output-dir; its metrics.jsonl holds, per epoch, the
evaluated accuracy (top1, top5), the training clock (train_seconds: evaluation and
checkpoints not counted) and the payload each rank has sent since the start
(payload_bytes_total); --eval-every adds records with the same three mid-epoch (runs
written before they carried the bytes show those on the time panel only). A run whose hook counts no bytes
(powersgd) is left out of the bytes panel with a note. Labels come from the run's own
records (comm hook, sample ratio), with the directory's name where two would be equal.
matplotlib is optional: pip install 'approxdist[plots]'.
"""
import argparse
import json
import os
import sys

METRICS = "metrics.jsonl"
ACCURACY = ("top1", "top5")


class PlotError(ValueError):
    """A run directory that cannot be plotted (one line naming it)."""


def read_records(run_dir):
    """The JSON records of a run's metrics.jsonl, in file order (a line cut short by a killed
    writer is skipped, as the app's own rewind skips it)."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise PlotError(f"RUN_DIR: no {METRICS} in {run_dir} (expected an approxdist-train --output-dir)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _label(records):
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    hook, ratio = last.get("comm_hook"), last.get("sample_ratio")
    parts = [str(hook) if hook is not None else None, f"ratio {ratio:g}" if ratio is not None else None]
    return ", ".join(p for p in parts if p) or None


def run_series(run_dir, metric="top1", label=None):
    """What the figure draws for one run, as plain lists:
    label; time: (train_seconds, accuracy) of every evaluation (epoch ends and --eval-every),
    by step; bytes: (payload_bytes_total, accuracy) of every evaluation that counts bytes."""
    if metric not in ACCURACY:
        raise PlotError(f"--metric: expected one of {', '.join(ACCURACY)}, got {metric!r}")
    records = read_records(run_dir)
    evaluated = sorted((r for r in records if r.get("kind") in ("epoch", "eval")
                        and r.get(metric) is not None and r.get("train_seconds") is not None),
                       key=lambda r: r.get("step", 0))
    if not evaluated:
        raise PlotError(f"RUN_DIR: {run_dir}/{METRICS} holds no evaluated epoch yet")
    counted = [r for r in evaluated if r.get("payload_bytes_total") is not None]
    return {
        "run_dir": run_dir,
        "label": label or _label(records) or os.path.basename(os.path.normpath(run_dir)),
        "metric": metric,
        "steps": [r["step"] for r in evaluated],
        "seconds": [r["train_seconds"] for r in evaluated],
        "accuracy": [r[metric] for r in evaluated],
        "bytes_steps": [r["step"] for r in counted],
        "bytes": [r["payload_bytes_total"] for r in counted],
        "bytes_accuracy": [r[metric] for r in counted],
    }


def collect(run_dirs, metric="top1", labels=None):
    """run_series of each directory; labels that two runs share get the directory's name."""
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"--labels: expected one label per RUN_DIR ({len(run_dirs)}), got {len(labels)}")
    series = [run_series(d, metric, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [s["label"] for s in series]
    for s in series:
        if names.count(s["label"]) > 1:
            s["label"] = f"{os.path.basename(os.path.normpath(s['run_dir']))}: {s['label']}"
    return series


def draw(series, output):
    """Two panels, accuracy against training seconds and against MB sent per rank; writes
    `output` (its suffix picks the format: png, pdf, svg)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("approxdist-plot needs matplotlib: pip install 'approxdist[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        by_time.plot(s["seconds"], s["accuracy"], marker="o", color=color, label=s["label"])
        if s["bytes"]:
            by_bytes.plot([b / 1e6 for b in s["bytes"]], s["bytes_accuracy"], marker="o", color=color,
                          label=s["label"])
    metric = series[0]["metric"]
    by_time.set_xlabel("training time (s; evaluation not counted)")
    by_bytes.set_xlabel("gradient payload sent per rank (MB)")
    for ax in (by_time, by_bytes):
        ax.set_ylabel(f"eval {metric} (%)")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    if any(s["bytes"] for s in series):
        by_bytes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="approxdist-plot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="approxdist-train --output-dir(s)")
    p.add_argument("-o", "--output", default="runs.png", help="figure file (png, pdf, svg)")
    p.add_argument("--metric", default="top1", choices=ACCURACY, help="the accuracy drawn")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per RUN_DIR (default: the run's comm hook and sample ratio)")
    return p.parse_args(argv)


def main(argv=None):
    """Plot as the command line says; returns the series drawn."""
    args = parse_args(argv)
    series = collect(args.run_dirs, args.metric, args.labels)
    for s in series:
        if not s["bytes"]:
            print(f"approxdist-plot: {s['run_dir']}: no byte counts (its hook reports none): "
                  f"left out of the bytes panel", file=sys.stderr)
    draw(series, args.output)
    print(f"approxdist-plot: wrote {args.output}")
    return series


def cli(argv=None):
    """Entry point: a bad RUN_DIR or a missing matplotlib ends in one line and status 2."""
    try:
        main(argv)
    except PlotError as exc:
        print(f"approxdist-plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["read_records", "run_series", "collect", "draw", "main", "cli", "PlotError"]

if __name__ == "__main__":
    sys.exit(cli())
