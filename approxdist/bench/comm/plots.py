"""The benchmark's two figures: step time against bytes per step (with the physical
limit of a step at the measured link rate), and the speedup against the sample ratio."""
from __future__ import annotations

from pathlib import Path

from .summary import ring_bytes

__all__ = ["plot"]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(summary: list[dict], outdir: Path, prefix: str = "comm") -> list[Path]:
    """Step time vs bytes per step, and speedup vs sample ratio per link rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    setups = sorted({(s["nodes"], s["rate"]) for s in summary}, key=lambda t: (t[1], t[0]))
    models = sorted({s["model"] for s in summary})
    markers = {"allreduce": "s", "fp16": "D", "powersgd": "^", "sparse": "o"}
    fig, axes = plt.subplots(len(models), len(setups), squeeze=False,
                             figsize=(4.2 * len(setups), 3.6 * len(models)))
    for mi, model in enumerate(models):
        for si, (nodes, rate) in enumerate(setups):
            ax = axes[mi][si]
            if not any(s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                       for s in summary):
                ax.set_visible(False)  # this model was not run on this setup
                continue
            for s in summary:
                if s["model"] != model or (s["nodes"], s["rate"]) != (nodes, rate):
                    continue
                ax.scatter(s["payload_bytes"] / 1e6, s["step_s"], marker=markers[s["kind"]],
                           color="C3" if s["kind"] == "sparse" else "C0")
                ax.annotate(s["hook"], (s["payload_bytes"] / 1e6, s["step_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            link = next((s["link_bits_per_s"] for s in summary if s["model"] == model
                         and (s["nodes"], s["rate"]) == (nodes, rate) and s.get("link_bits_per_s")),
                        None)
            if link:
                # The physical limit of a step: the payload's all-reduce at the measured
                # link rate, or compute alone, whichever is longer.
                dense = max(s["dense_bytes"] for s in summary if s["model"] == model)
                comp = min(s["compute_s"] for s in summary if s["model"] == model
                           and (s["nodes"], s["rate"]) == (nodes, rate))
                xs = [dense * i / 50 for i in range(51)]
                ax.plot([x / 1e6 for x in xs],
                        [max(comp, 8 * ring_bytes(x, nodes) / link) for x in xs],
                        ls="--", color="grey", lw=1,
                        label="max(fastest compute, payload at link rate)")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{model}, {nodes} nodes, {rate}", fontsize=9)
            ax.set_xlabel("payload MB / step")
            ax.set_ylabel("median step s")
            ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
    paths.append(_save(fig, outdir / f"{prefix}_step_vs_bytes.png"))

    fig, axes = plt.subplots(1, len(models), squeeze=False, figsize=(5 * len(models), 3.8))
    for mi, model in enumerate(models):
        ax = axes[0][mi]
        for ci, (nodes, rate) in enumerate(setups):
            pts = sorted((s["ratio"], s["speedup"]) for s in summary
                         if s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                         and s["kind"] == "sparse" and not s["fp16"] and s.get("speedup"))
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{ci}", label=f"sparse, {nodes} nodes {rate}")
            for s in summary:
                if (s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                        and s["kind"] == "fp16" and s.get("speedup")):
                    ax.axhline(s["speedup"], color=f"C{ci}", ls=":", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model}: speedup over all-reduce (dotted: fp16)", fontsize=9)
        ax.set_xlabel("sample_ratio")
        ax.set_ylabel("speedup")
        ax.legend(fontsize=7)
    paths.append(_save(fig, outdir / f"{prefix}_speedup_vs_ratio.png"))
    return paths
