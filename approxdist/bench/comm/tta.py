"""`approxdist-bench comm --testbed --time-to-accuracy`: wall-clock time to a fixed test
accuracy, per comm hook, on the namespace testbed with real data (the digits dataset).

Bytes per step flatter PowerSGD, which sends far fewer bytes but is lossy and so may need
more steps; the sparse hook is lossless for the model it trains, but that model computes
with a fraction of its channels. Time to accuracy charges each for what it really costs.
Each run is `approxdist-train` under torchrun, one rank per node; runs are interleaved
over hooks and repeated.

The clock is approxdist-train's training clock (`train_seconds`: the steps, their
transfers included, without the evaluations and checkpoints), read at evaluations every
`eval_every` steps: process start and rendezvous take seconds that are the same for every
hook and would hide the difference. The time from launch is kept beside it.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["TTA_HOOKS", "EVAL_EVERY", "TTA_TARGET", "train_argv", "time_to_target", "curves", "run_tta", "summarize_tta"]

# name -> approxdist-train options
TTA_HOOKS = {
    "allreduce": ["--comm-hook", "allreduce"],
    "fp16": ["--comm-hook", "fp16"],
    "powersgd1": ["--comm-hook", "powersgd", "--powersgd-rank", "1"],
    "sparse0.5": ["--comm-hook", "sparse", "--sample-ratio", "0.5"],
    "sparse0.33": ["--comm-hook", "sparse", "--sample-ratio", "0.33"],
    "sparse0.33+fp16": ["--comm-hook", "sparse-fp16", "--sample-ratio", "0.33"],
    # per-layer ratios whose payload is 0.33 of the dense bytes (--budget)
    "sparse-budget0.33": ["--comm-hook", "sparse", "--budget", "0.33"],
    "sparse-budget0.33+fp16": ["--comm-hook", "sparse-fp16", "--budget", "0.33"],
    # the next forward overlapping the transfer, the optimizer stepping in the hook
    "fp16+overlap": ["--comm-hook", "fp16", "--overlap-forward"],
    "sparse0.33+fp16+overlap": ["--comm-hook", "sparse-fp16", "--sample-ratio", "0.33", "--overlap-forward"],
    "sparse-budget0.33+fp16+overlap": ["--comm-hook", "sparse-fp16", "--budget", "0.33", "--overlap-forward"],
    # the sampled forward of the layers (--sample-mode forward; the default is weight_grad)
    "sparse0.5-forward": ["--comm-hook", "sparse", "--sample-ratio", "0.5", "--sample-mode", "forward"],
    "sparse0.33-forward": ["--comm-hook", "sparse", "--sample-ratio", "0.33", "--sample-mode", "forward"],
}


TTA_TARGET = 97.0  # test top-1 % (approxdist-bench comm --target)
EVAL_EVERY = 2  # steps between evaluations (digits at batch 32 on 2 ranks: 22 steps an epoch)


def train_argv(hook: str, out_dir: str, *, model: str, epochs: int, batch: int, seed: int,
               eval_every: int = EVAL_EVERY, width: int | None = None, image_size: int | None = None,
               lr: float | None = None, bucket_mb: float | None = None) -> list[str]:
    """approxdist-train's arguments for one run; width: the built-in model's (--width);
    image_size, lr, bucket_mb: --image-size, --lr and --bucket-cap-mb where given."""
    if hook not in TTA_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(TTA_HOOKS)}, got {hook!r}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if width is not None and width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return ["-m", "approxdist.train", "--model", model, "--dataset", "digits",
            *([] if width is None else ["--width", str(width)]),
            *([] if image_size is None else ["--image-size", str(image_size)]),
            *([] if lr is None else ["--lr", str(lr)]),
            *([] if bucket_mb is None else ["--bucket-cap-mb", str(bucket_mb)]),
            "--epochs", str(epochs), "--batch-size", str(batch), "--backend", "gloo",
            "--seed", str(seed), "--output-dir", out_dir, "--no-progress",
            "--eval-every", str(eval_every), *TTA_HOOKS[hook]]


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time (or step) at which the test accuracy reached target (None: never)."""
    return next((t for t, acc in curve if acc >= target), None)


def curves(records: list[dict], t0: float) -> dict:
    """The accuracy curves of one run's metrics.jsonl records (evaluations every few
    steps and at each epoch's end, in step order): against the training clock
    ("train_curve"), the wall time since launch t0 ("curve") and the step ("step_curve")."""
    evals = sorted((r for r in records if r.get("kind") in ("eval", "epoch") and "top1" in r),
                   key=lambda r: (r["step"], r["time"]))
    return {"curve": [(r["time"] - t0, r["top1"]) for r in evals],
            "train_curve": [(r["train_seconds"], r["top1"]) for r in evals if "train_seconds" in r],
            "step_curve": [(r["step"], r["top1"]) for r in evals]}


def run_tta(tb, hooks: list[str], *, repeats: int, model: str, epochs: int, batch: int,
            eval_every: int = EVAL_EVERY, width: int | None = None, image_size: int | None = None,
            lr: float | None = None, bucket_mb: float | None = None, verbose: bool = True) -> list[dict]:
    """Every hook `repeats` times, interleaved; each row holds its curves (see `curves`)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="adtta-") as tmp:
        os.chmod(tmp, 0o755)
        run = 0
        for rep in range(repeats):
            for hook in hooks:
                out = os.path.join(tmp, f"{hook}-{rep}")
                port = 29400 + run % 50
                run += 1
                args = train_argv(hook, out, model=model, epochs=epochs, batch=batch, seed=rep,
                                  eval_every=eval_every, width=width, image_size=image_size, lr=lr,
                                  bucket_mb=bucket_mb)
                t0 = time.time()
                tb.run_checked(
                    lambda i: [sys.executable, "-m", "torch.distributed.run",
                               *tb.torchrun_args(i, port=port), *args],
                    env_of=lambda i: {**os.environ, "GLOO_SOCKET_IFNAME": "eth0",
                                      "OMP_NUM_THREADS": "1"},
                    timeout=1800, what=f"approxdist-train ({hook})")
                wall = time.time() - t0
                recs = [json.loads(line) for line in
                        (Path(out) / "metrics.jsonl").read_text().splitlines()]
                last = [r for r in recs if r.get("kind") == "epoch"][-1]
                rows.append({"hook": hook, "repeat": rep, "wall_s": wall, **curves(recs, t0),
                             "final_top1": last["top1"], "train_s": last.get("train_seconds"),
                             "payload_bytes_total": last.get("payload_bytes_total"),
                             "dense_bytes_total": last.get("dense_bytes_total"),
                             "steps": last.get("step")})
                if verbose:
                    print(f"[tta rep {rep}] {hook:<11} {wall:6.1f} s  final top1 "
                          f"{last['top1']:.2f}", file=sys.stderr, flush=True)
    return rows


def _median_reached(rows: list[dict], key: str, target: float):
    """(runs whose `key` curve reached target, median of when; None if none did)."""
    reached = [t for t in (time_to_target(r.get(key) or [], target) for r in rows) if t is not None]
    return len(reached), (statistics.median(reached) if reached else None)


def summarize_tta(rows: list[dict], target: float) -> list[dict]:
    """Per hook: how many runs reached target, and the medians (over those runs) of the
    training time, the steps and the time from launch it took; the speedup compares
    training times with DDP's all-reduce."""
    out = []
    for hook in dict.fromkeys(r["hook"] for r in rows):
        rs = [r for r in rows if r["hook"] == hook]
        n_train, train_t = _median_reached(rs, "train_curve", target)
        n_launch, launch_t = _median_reached(rs, "curve", target)
        _, steps = _median_reached(rs, "step_curve", target)
        per_step = [r["train_s"] / r["steps"] for r in rs if r.get("train_s") and r.get("steps")]
        out.append({"hook": hook, "runs": len(rs),
                    # rows from before the training clock have only the launch curve
                    "reached": n_train if any(r.get("train_curve") for r in rs) else n_launch,
                    "train_time_to_target_s": train_t, "steps_to_target": steps,
                    "time_to_target_s": launch_t,
                    "train_s_per_step": statistics.median(per_step) if per_step else None,
                    "wall_s": statistics.median(r["wall_s"] for r in rs),
                    "final_top1": statistics.median(r["final_top1"] for r in rs),
                    # PowerSGD's payload is not counted (None): its matrices' sizes are internal
                    "payload_per_dense": (rs[0]["payload_bytes_total"] / rs[0]["dense_bytes_total"]
                                          if rs[0].get("dense_bytes_total")
                                          and rs[0].get("payload_bytes_total") is not None else None)})
    base = next((s for s in out if s["hook"] == "allreduce"), None)
    for s in out:
        key = "train_time_to_target_s" if base and base["train_time_to_target_s"] else "time_to_target_s"
        s["speedup"] = (base[key] / s[key] if base and base[key] and s[key] else None)
    return out


def format_tta_table(summary: list[dict], target: float) -> str:
    lines = [f"| hook | runs reaching {target:g}% | training s to {target:g}% | speedup | "
             f"steps to {target:g}% | s from launch to {target:g}% | training s / step | "
             "final top1 % | run wall s | payload / dense |", "|---|---|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for s in summary:
        cells = [s["hook"], f"{s['reached']}/{s['runs']}", num(s.get("train_time_to_target_s"), ".2f"),
                 "-" if s["speedup"] is None else f"{s['speedup']:.2f}x",
                 num(s.get("steps_to_target"), "g"), num(s["time_to_target_s"], ".1f"),
                 num(s.get("train_s_per_step"), ".3f"), f"{s['final_top1']:.2f}",
                 f"{s['wall_s']:.1f}", num(s["payload_per_dense"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tta(rows: list[dict], target: float, path: Path, title: str = "digits, 2 nodes") -> Path:
    """Test accuracy against the training clock, one line per run (against the time since
    launch for rows from before the clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_clock = all(r.get("train_curve") for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {h: f"C{i}" for i, h in enumerate(dict.fromkeys(r["hook"] for r in rows))}
    seen = set()
    for r in rows:
        curve = r["train_curve"] if train_clock else r["curve"]
        if not curve:
            continue
        t, acc = zip(*curve)
        ax.plot(t, acc, color=colors[r["hook"]], marker=".", ms=3, lw=1,
                label=None if r["hook"] in seen else r["hook"])
        seen.add(r["hook"])
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training time (steps and their transfers), s" if train_clock
                  else "wall time since launch, s")
    ax.set_ylabel("test top-1 %")
    ax.set_ylim(max(0.0, target - 30), 100)
    ax.set_title(f"{title}: accuracy vs time", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
