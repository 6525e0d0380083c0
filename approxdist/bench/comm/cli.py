"""`approxdist-bench comm`'s command line: the flags, their checks, and the three things it
does: time steps (loopback or testbed), time to accuracy (testbed), or render a saved
run (`--render F.json`: the table, the plots, and with `--markdown` the docs' block).

A run writes JSON and plots only; markdown comes from the render step, so the docs
change when someone decides they should, from a file that stays.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .environment import cpu_reference_end, environment
from .hooks import make_model
from .plots import plot
from .report import (
    format_table,
    is_testbed,
    markdown_body,
    tta_markdown,
    with_retransmits,
    write_markdown_section,
)
from .specs import DEFAULT_BUCKET_MB, Plan, RunConfig, TtaPlan, parse_hook
from .summary import summarize
from .worker import run_loopback, run_on_testbed, worker_main

__all__ = ["main", "parser", "LOOPBACK_HOOKS", "TESTBED_HOOKS"]

LOOPBACK_HOOKS = ["allreduce", "fp16", "sparse1", "sparse0.5", "sparse0.33", "sparse0.25"]
TESTBED_HOOKS = ["allreduce", "fp16", "powersgd1", "powersgd4", "sparse0.5", "sparse0.33",
                 "sparse0.25", "sparse0.5+fp16", "sparse0.33+fp16"]
DESCRIPTION = ("`approxdist-bench comm`: what the sparse all-reduce hook saves, next to what users "
               "would use instead (DDP's all-reduce, fp16 compression, PowerSGD).")


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    from approxdist.distributed import EAGER_FRACTION

    p = argparse.ArgumentParser(prog="approxdist-bench comm", description=DESCRIPTION)
    p.add_argument("--testbed", action="store_true",
                   help="run on the namespace testbed (needs root and iproute2's ip netns and tc: refused up "
                        "front, in one line, without them)")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--hooks", default=None,
                   help=f"default loopback: {','.join(LOOPBACK_HOOKS)}; "
                        f"testbed: {','.join(TESTBED_HOOKS)}; any name + '+step': the "
                        f"optimizer steps inside the hook, bucket by bucket "
                        f"(approxdist.distributed.optimizer_wrapper); + '+overlap': the next "
                        f"forward overlaps the transfer (approxdist.distributed.forward_overlap), "
                        f"'+overlapF' with eager fraction F (e.g. sparse0.33+overlap0.3)")
    p.add_argument("--nodes", default="2,4", help="testbed node counts")
    p.add_argument("--rates", default="1gbit,100mbit", help="testbed link rates")
    p.add_argument("--burst", default=None,
                   help="tbf bucket of every testbed link, a tc size like 16kb (default: 1 ms at "
                        "the rate, at least 96 KiB; messages under it pass unshaped)")
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per run: DDP rebuilds its buckets after the first, the "
                        "second touches the rebuilt buffers (PowerSGD always gets 2)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all hooks")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help="DDP bucket_cap_mb of every hook but PowerSGD (one bucket) (default: %(default)s)")
    p.add_argument("--eager-fraction", type=float, default=EAGER_FRACTION,
                   help="+overlap without F: share of the bucket elements launched as DDP hands them over, the "
                        "rest first-layers-first after backward (forward_overlap; default: %(default)s)")
    p.add_argument("--json", default=None, help="write raw rows and the summary here "
                   "(rewritten after every testbed, so a cut-short run keeps what it measured)")
    p.add_argument("--plots", default=None, help="directory for the PNG plots")
    p.add_argument("--markdown", default=None,
                   help="with --render: replace the run's block in the '## Communication' section "
                        "of this file (a run itself writes no markdown)")
    g = p.add_argument_group("time to accuracy (--testbed --time-to-accuracy)")
    g.add_argument("--time-to-accuracy", action="store_true",
                   help="instead of step times: approxdist-train on digits until --target")
    g.add_argument("--target", type=float, default=None,
                   help="test top-1 %% to reach (default: 97; with --render: the run's)")
    g.add_argument("--tta-hooks", default="allreduce,fp16,powersgd1,sparse0.5,sparse0.33")
    g.add_argument("--tta-model", default="cnn")
    g.add_argument("--tta-width", type=int, default=None,
                   help="the built-in model's size (approxdist-train --width; default: its own)")
    g.add_argument("--tta-image-size", type=int, default=None,
                   help="digits upscaled to this size in 3 channels (approxdist-train --image-size; for "
                        "torchvision models such as resnet18, which want 32)")
    g.add_argument("--tta-lr", type=float, default=None, help="approxdist-train --lr (default: its own, 0.1)")
    g.add_argument("--tta-bucket-mb", type=float, default=None,
                   help="DDP's bucket_cap_mb for every hook (approxdist-train --bucket-cap-mb; default: its own, 25)")
    g.add_argument("--tta-epochs", type=int, default=6)
    g.add_argument("--tta-batch", type=int, default=32, help="per rank")
    g.add_argument("--tta-rate", default="100mbit")
    g.add_argument("--tta-eval-every", type=int, default=None,
                   help="evaluate every N steps (approxdist-train --eval-every; default: 2)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: redo the table and plots from a --json file (of either "
                        "mode; a time-to-accuracy file at --target if given), and the markdown "
                        "block with --markdown")
    p.add_argument("--no-cpu-reference", dest="cpu_reference", action="store_false",
                   help="skip timing the CPU reference workload before the run, which the "
                        "JSON and markdown record (approxdist-bench cpu; about 15 s)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1:])
    p = parser()
    a = p.parse_args(argv)
    if a.render:
        return render(a.render, plots=a.plots, markdown=a.markdown, target=a.target)
    if a.markdown:
        p.error("--markdown is written by the render step, not by a run: run with --json F.json, "
                "then approxdist-bench comm --render F.json --markdown " + a.markdown)
    if a.burst is not None:
        if not a.testbed:
            p.error("--burst shapes the testbed's links: add --testbed")
        if "none" in ([a.tta_rate] if a.time_to_accuracy else _csv(a.rates)):
            p.error("--burst: the 'none' rate leaves links unshaped, without a burst; drop one of them")
        from ..testbed import parse_size

        try:
            parse_size(a.burst)
        except ValueError as e:
            p.error(f"--{e}")
    command = "approxdist-bench comm " + " ".join(argv)
    if a.time_to_accuracy:
        if not a.testbed:
            p.error("--time-to-accuracy runs on the testbed: add --testbed")
        return run_tta_mode(a, command)
    return run_steps_mode(p, a, command)


def _plan_of(p, a) -> Plan:
    """The step-time plan the parsed options `a` ask for (a usage error if they are bad)."""
    for name in ("batch", "image_size", "steps", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    hooks = _csv(a.hooks) if a.hooks else (TESTBED_HOOKS if a.testbed else LOOPBACK_HOOKS)
    for h in hooks:
        try:
            parse_hook(h)
        except ValueError as e:
            p.error(str(e))
    models = _csv(a.models)
    for m in models:
        try:
            make_model(m)
        except ValueError as e:
            p.error(str(e))
    if not a.bucket_mb > 0:
        p.error(f"--bucket-mb must be > 0, got {a.bucket_mb}")
    if not 0 < a.eager_fraction <= 1:
        p.error(f"--eager-fraction must be in (0, 1], got {a.eager_fraction}")
    configs = []
    for m in models:
        for h in hooks:
            spec = parse_hook(h)
            configs.append(RunConfig(m, h, bucket_mb=a.bucket_mb,
                                     eager_fraction=(spec.eager_fraction or a.eager_fraction) if spec.overlap
                                     else None))
    return Plan(configs, batch=a.batch, image_size=a.image_size, steps=a.steps, warmup=a.warmup,
                repeats=a.repeats, seed=0, compute_steps=2, compute_repeats=1, verbose=not a.quiet)


def _write_json(path, saved: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(saved, indent=1))


def _testbed_available() -> bool:
    """Root and iproute2 are checked before any work (the CPU reference, the plan's models)."""
    from ..testbed import available

    ok, why = available()
    if not ok:
        print(f"approxdist-bench comm --testbed: {why}", file=sys.stderr)
    return ok


def run_steps_mode(p, a, command: str) -> int:
    """Step times of every (model, hook) on loopback or on the testbed's setups."""
    plan = _plan_of(p, a)
    if a.testbed and not _testbed_available():
        return 2
    env = environment(a.cpu_reference, a.quiet)
    rows: list[dict] = []
    links: dict = {}

    def save():
        if a.json:
            if "cpu_reference_end" not in env:  # the load the run left, not the reference's
                env["loadavg_end"] = list(os.getloadavg())
            _write_json(a.json, {"command": command, "environment": env, "plan": plan.to_dict(),
                                 "links": links, "summary": summarize(rows), "rows": rows})

    if not a.testbed:
        plan.threads = max(1, (os.cpu_count() or 2) // 2)
        rows = run_loopback(plan, world=2)
    else:
        from ..testbed import Testbed, available

        ok, why = available()
        if not ok:
            print(f"approxdist-bench comm --testbed: {why}", file=sys.stderr)
            return 2
        for rate in _csv(a.rates):
            for nodes in (int(n) for n in _csv(a.nodes)):
                plan.threads = max(1, (os.cpu_count() or 2) // nodes)
                with Testbed(nodes, rate, burst=a.burst) as tb:
                    link = tb.measure_allreduce(25_000_000 if rate != "none" else 100_000_000)
                    link["burst_bytes"] = tb.burst_bytes
                    links[f"{nodes} nodes, {rate}"] = link
                    if not a.quiet:
                        print(f"testbed {nodes} nodes {rate}: gloo all-reduce carries "
                              f"{link['link_bits_per_s'] / 1e9:.3f} Gbit/s per link",
                              file=sys.stderr, flush=True)
                    for r in run_on_testbed(tb, plan):
                        r.update(nodes=nodes, rate=rate, link_bits_per_s=link["link_bits_per_s"])
                        rows.append(r)
                save()
    env["loadavg_end"] = list(os.getloadavg())
    cpu_reference_end(env, a.quiet)
    summary = summarize(rows)
    print(with_retransmits(format_table(summary, a.testbed), summary))
    save()
    if a.plots:
        plot(summary, Path(a.plots), f"comm_{'testbed' if a.testbed else 'loopback'}")
    return 0


def _tta_plan_of(a) -> TtaPlan:
    """The settings of a time-to-accuracy run, from its parsed options (defaults resolved)."""
    from .tta import EVAL_EVERY, TTA_TARGET

    return TtaPlan(model=a.tta_model, width=a.tta_width, epochs=a.tta_epochs, batch=a.tta_batch,
                   rate=a.tta_rate, eval_every=EVAL_EVERY if a.tta_eval_every is None else a.tta_eval_every,
                   repeats=a.repeats, target=TTA_TARGET if a.target is None else a.target,
                   image_size=a.tta_image_size, lr=a.tta_lr, bucket_mb=a.tta_bucket_mb)


def saved_tta_plan(saved: dict) -> TtaPlan:
    """A time-to-accuracy run's settings: its saved plan, or, for a file from before the
    plan was saved, its command read with this parser (the defaults of that time)."""
    if "plan" in saved:
        return TtaPlan.from_dict(saved["plan"])
    return _tta_plan_of(parser().parse_known_args(shlex.split(saved["command"])[2:])[0])


def run_tta_mode(a, command: str) -> int:
    """Time to accuracy of every --tta-hooks hook, 2 testbed nodes at --tta-rate."""
    from ..testbed import Testbed, available
    from .tta import TTA_HOOKS, run_tta

    plan = _tta_plan_of(a)
    if plan.eval_every < 1:
        raise ValueError(f"--tta-eval-every must be >= 1, got {plan.eval_every}")
    if plan.width is not None and plan.width < 1:
        raise ValueError(f"--tta-width must be >= 1, got {plan.width}")
    if plan.image_size is not None and plan.image_size < 8:
        raise ValueError(f"--tta-image-size must be >= 8, got {plan.image_size}")
    if plan.lr is not None and not plan.lr > 0:
        raise ValueError(f"--tta-lr must be > 0, got {plan.lr}")
    if plan.bucket_mb is not None and not plan.bucket_mb > 0:
        raise ValueError(f"--tta-bucket-mb must be > 0, got {plan.bucket_mb}")
    hooks = _csv(a.tta_hooks)
    for h in hooks:
        if h not in TTA_HOOKS:
            raise ValueError(f"--tta-hooks: each must be one of {', '.join(TTA_HOOKS)}, got {h!r}")
    ok, why = available()
    if not ok:
        print(f"approxdist-bench comm --testbed: {why}", file=sys.stderr)
        return 2
    env = environment(a.cpu_reference, a.quiet)
    with Testbed(2, plan.rate, burst=a.burst) as tb:
        link = tb.measure_allreduce(5_000_000)
        link["burst_bytes"] = tb.burst_bytes
        rows = run_tta(tb, hooks, repeats=plan.repeats, model=plan.model, epochs=plan.epochs,
                       batch=plan.batch, eval_every=plan.eval_every, width=plan.width,
                       image_size=plan.image_size, lr=plan.lr, bucket_mb=plan.bucket_mb,
                       verbose=not a.quiet)
    env["loadavg_end"] = list(os.getloadavg())
    cpu_reference_end(env, a.quiet)
    saved = {"command": command, "environment": env, "plan": plan.to_dict(), "link": link, "rows": rows}
    if a.json:  # the raw rows first: a failure below must not lose the measurements
        _write_json(a.json, saved)
    saved["summary"] = _tta_outputs(saved, plan.target, a.plots, None)
    if a.json:
        _write_json(a.json, saved)
    return 0


def _tta_outputs(saved: dict, target: float, plots, markdown) -> list[dict]:
    """Print a time-to-accuracy run's table; its plot into `plots` and its markdown block
    into `markdown` when given. Returns the summary at `target`. A run of another model, or
    of a built-in model at another --tta-width, gets its own plot and block, beside the
    default one's."""
    from .tta import format_tta_table, plot_tta, summarize_tta

    plan = saved_tta_plan(saved)
    name = plan.model if plan.width is None else f"{plan.model} width {plan.width}"
    # the default model's block and plot have no suffix; another model's or width's their own
    suffix = "" if (plan.model, plan.width) == ("cnn", None) else f"-{plan.model}{plan.width or ''}"
    summary = summarize_tta(saved["rows"], target)
    table = format_tta_table(summary, target)
    print(table)
    png = plot_tta(saved["rows"], target,
                   Path(plots) / f"comm_tta_accuracy_vs_time{suffix.replace('-', '_')}.png",
                   title=f"{name} on digits, 2 nodes at {plan.rate}") if plots else None
    if markdown:
        body = tta_markdown(saved, plan, summary, table, target, png, Path(markdown).parent)
        write_markdown_section(Path(markdown), body, "time-to-accuracy" + suffix)
    return summary


def render(path, *, plots=None, markdown=None, target=None) -> int:
    """Measure nothing: the table (printed), the plots (into `plots`) and the markdown
    block (into the file `markdown`) of a saved run of either mode."""
    saved = json.loads(Path(path).read_text())
    if "link" in saved and "links" not in saved:  # a time-to-accuracy run
        _tta_outputs(saved, saved_tta_plan(saved).target if target is None else target, plots, markdown)
        return 0
    testbed = is_testbed(saved)
    summary = summarize(saved["rows"])
    table = with_retransmits(format_table(summary, testbed), summary)
    print(table)
    mode = "testbed" if testbed else "loopback"
    pngs = plot(summary, Path(plots), f"comm_{mode}") if plots else []
    if markdown:
        write_markdown_section(Path(markdown), markdown_body(saved, table, pngs, Path(markdown).parent), mode)
    return 0
