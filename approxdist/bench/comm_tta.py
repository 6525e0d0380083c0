"""`approxdist-bench comm --testbed --time-to-accuracy`: wall-clock time to a fixed test
accuracy, per comm hook, on the namespace testbed with real data (the digits dataset).

Bytes per step flatter PowerSGD, which sends far fewer bytes but is lossy and so may need
more steps; the sparse hook is lossless for the model it trains, but that model computes
with a fraction of its channels. Time to accuracy charges each for what it really costs.
Each run is `approxdist-train` under torchrun, one rank per node; runs are interleaved
over hooks and repeated.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["TTA_HOOKS", "train_argv", "time_to_target", "run_tta", "summarize_tta"]

# name -> approxdist-train options
TTA_HOOKS = {
    "allreduce": ["--comm-hook", "allreduce"],
    "fp16": ["--comm-hook", "fp16"],
    "powersgd1": ["--comm-hook", "powersgd", "--powersgd-rank", "1"],
    "sparse0.5": ["--comm-hook", "sparse", "--sample-ratio", "0.5"],
    "sparse0.33": ["--comm-hook", "sparse", "--sample-ratio", "0.33"],
}


def train_argv(hook: str, out_dir: str, *, model: str, epochs: int, batch: int, seed: int
               ) -> list[str]:
    if hook not in TTA_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(TTA_HOOKS)}, got {hook!r}")
    return ["-m", "approxdist.train", "--model", model, "--dataset", "digits",
            "--epochs", str(epochs), "--batch-size", str(batch), "--backend", "gloo",
            "--seed", str(seed), "--output-dir", out_dir, "--no-progress", *TTA_HOOKS[hook]]


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """First wall time at which the test accuracy reached target (None: never)."""
    return next((t for t, acc in curve if acc >= target), None)


def _curve(metrics_path: Path, t0: float) -> list[tuple[float, float]]:
    curve = []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "epoch" and "top1" in rec:
            curve.append((rec["time"] - t0, rec["top1"]))
    return curve


def run_tta(tb, hooks: list[str], *, repeats: int, model: str, epochs: int, batch: int,
            verbose: bool = True) -> list[dict]:
    """Every hook `repeats` times, interleaved; wall time counts from the launch, so
    process start and rendezvous are in it, equally for every hook."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="adtta-") as tmp:
        os.chmod(tmp, 0o755)
        run = 0
        for rep in range(repeats):
            for hook in hooks:
                out = os.path.join(tmp, f"{hook}-{rep}")
                port = 29400 + run % 50
                run += 1
                args = train_argv(hook, out, model=model, epochs=epochs, batch=batch, seed=rep)
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
                rows.append({"hook": hook, "repeat": rep, "wall_s": wall,
                             "curve": _curve(Path(out) / "metrics.jsonl", t0),
                             "final_top1": last["top1"],
                             "payload_bytes_total": last.get("payload_bytes_total"),
                             "dense_bytes_total": last.get("dense_bytes_total"),
                             "steps": last.get("step")})
                if verbose:
                    print(f"[tta rep {rep}] {hook:<11} {wall:6.1f} s  final top1 "
                          f"{last['top1']:.2f}", file=sys.stderr, flush=True)
    return rows


def summarize_tta(rows: list[dict], target: float) -> list[dict]:
    out = []
    for hook in dict.fromkeys(r["hook"] for r in rows):
        rs = [r for r in rows if r["hook"] == hook]
        reached = [time_to_target(r["curve"], target) for r in rs]
        ok = [t for t in reached if t is not None]
        out.append({"hook": hook, "runs": len(rs), "reached": len(ok),
                    "time_to_target_s": statistics.median(ok) if ok else None,
                    "wall_s": statistics.median(r["wall_s"] for r in rs),
                    "final_top1": statistics.median(r["final_top1"] for r in rs),
                    # PowerSGD's payload is not counted (None): its matrices' sizes are internal
                    "payload_per_dense": (rs[0]["payload_bytes_total"] / rs[0]["dense_bytes_total"]
                                          if rs[0].get("dense_bytes_total")
                                          and rs[0].get("payload_bytes_total") is not None else None)})
    base = next((s["time_to_target_s"] for s in out if s["hook"] == "allreduce"), None)
    for s in out:
        s["speedup"] = (base / s["time_to_target_s"]
                        if base and s["time_to_target_s"] else None)
    return out


def format_tta_table(summary: list[dict], target: float) -> str:
    lines = [f"| hook | runs reaching {target:g}% | time to {target:g}% s | speedup | "
             "final top1 % | run wall s | payload / dense |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        t, sp, ppd = s["time_to_target_s"], s["speedup"], s["payload_per_dense"]
        cells = [s["hook"], f"{s['reached']}/{s['runs']}", "-" if t is None else f"{t:.1f}",
                 "-" if sp is None else f"{sp:.2f}x", f"{s['final_top1']:.2f}",
                 f"{s['wall_s']:.1f}", "-" if ppd is None else f"{ppd:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tta(rows: list[dict], target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {h: f"C{i}" for i, h in enumerate(dict.fromkeys(r["hook"] for r in rows))}
    seen = set()
    for r in rows:
        if not r["curve"]:
            continue
        t, acc = zip(*r["curve"])
        ax.plot(t, acc, color=colors[r["hook"]], marker=".", lw=1,
                label=None if r["hook"] in seen else r["hook"])
        seen.add(r["hook"])
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("wall time since launch, s")
    ax.set_ylabel("test top-1 %")
    ax.set_ylim(max(0.0, target - 30), 100)
    ax.set_title("digits, 2 nodes at 100mbit: accuracy vs wall time", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
