"""The run rendered for people: the summary table, the retransmission sentence, and the
markdown block of docs/benchmarks.md (the command, the setting, the table, the plots).

Markdown is written only by the explicit render step (`approxdist-bench comm --render
F.json --markdown docs/benchmarks.md`), never by a run: a run writes its JSON and plots,
and what the docs show is a choice made afterwards, from a file anyone can re-render.
"""
from __future__ import annotations

import os
from pathlib import Path

from .specs import DEFAULT_BUCKET_MB

__all__ = ["is_testbed", "format_table", "retransmit_line", "with_retransmits", "markdown_body", "tta_markdown",
           "write_markdown_section", "probe_detail", "burst_detail", "cpu_reference_lines"]


def speedup_cell(s: dict) -> str:
    """The speedup cell: 2.51x, followed by the range of the paired per-round speedups
    when there are several rounds, as in 2.51x (2.40-2.63)."""
    if not s.get("speedup"):
        return "-"
    rounds = s.get("speedup_rounds") or []
    if len(rounds) < 2 or s["kind"] == "allreduce":  # (the baseline: 1 in every round)
        return f"{s['speedup']:.2f}x"
    return f"{s['speedup']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"


def format_table(summary: list[dict], testbed: bool) -> str:
    head = ["nodes", "link", "model", "hook", "step s", "speedup", "payload MB/step", "of dense"]
    if testbed:
        head += ["wire MB/step", "compute s", "all-reduce s at link", "step / limit", "step / DDP bound"]
    else:
        head += ["compute s", "hook s", "hook share", "pack+unpack share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [str(s["nodes"]), s["rate"], s["model"], s["hook"], f"{s['step_s']:.3f}",
                 speedup_cell(s),
                 f"{s['payload_bytes'] / 1e6:.2f}", f"{s['payload_bytes'] / s['dense_bytes']:.3f}"]
        if testbed:
            cells += [f"{s['wire_tx_bytes'] / 1e6:.2f}" if s.get("wire_tx_bytes") else "-",
                      f"{s['compute_s']:.3f}", f"{s['allreduce_s']:.3f}", f"{s['of_limit']:.2f}",
                      f"{s['of_ddp_bound']:.2f}" if "of_ddp_bound" in s else "-"]
        else:
            hook = s["kind"] != "allreduce" or s.get("step_in_hook")
            cells += [f"{s['compute_s']:.3f}", f"{s['hook_s']:.4f}" if hook else "(C++)",
                      f"{s['hook_share']:.1%}" if hook else "-",
                      f"{s['pack_unpack_share']:.1%}" if "pack_unpack_share" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retransmit_line(summary: list[dict]) -> str | None:
    """A sentence on the TCP segments the nodes retransmitted during the timed steps
    (None for runs that did not count them: loopback, or JSON files from before)."""
    counted = [s for s in summary if s.get("tcp_retransmits") is not None]
    if not counted:
        return None
    lead = "TCP segments retransmitted during the timed steps (every node, every round): "
    lossy = [s for s in counted if s["tcp_retransmits"] > 0]
    if not lossy:
        return lead + f"none in all {len(counted)} rows: no link dropped a packet."
    worst = max(lossy, key=lambda s: s["tcp_retransmits"])
    return (lead + f"{sum(s['tcp_retransmits'] for s in lossy)} in {len(lossy)} of {len(counted)} "
            f"rows, at most {worst['tcp_retransmits']} ({worst['nodes']} nodes {worst['rate']} "
            f"{worst['model']} {worst['hook']}). tbf drops what overflows its queue, and a lost "
            "packet stalls its TCP stream until the resend, so rows with many also time that.")


def write_markdown_section(path: Path, body: str, mode: str,
                           title: str = "## Communication") -> None:
    """Replace this mode's block of the Communication section of docs/benchmarks.md (and
    nothing else: other sections belong to other benchmarks)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    begin, end_mark = f"<!-- approxdist-bench comm: {mode} -->", f"<!-- end {mode} -->"
    block = [begin, *body.rstrip().splitlines(), end_mark]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [title, ""]
        start = len(lines) - 2
    stop = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
                len(lines))
    section = lines[start:stop]
    if begin in section and end_mark in section:
        b, e = section.index(begin), section.index(end_mark)
        section = section[:b] + block + section[e + 1:]
    else:
        while section and not section[-1].strip():
            section.pop()
        section += ["", *block, ""]
    lines = lines[:start] + section + lines[stop:]
    path.write_text("\n".join(lines).rstrip() + "\n")


def cpu_reference_lines(env: dict) -> list[str]:
    """The markdown paragraph stating the run's CPU reference; none for a run without one
    (older JSON files render as they did)."""
    if not env.get("cpu_reference"):
        return []
    from ..cpu_reference import describe

    end = env.get("cpu_reference_end")
    after = "" if not end else (f" (after it: {end['alone_ms']:.1f} ms alone, "
                                f"{end['all_cores_ms']:.1f} ms on all cores)")
    return [describe(env["cpu_reference"]) + ", taken before the run" + after + ": compare "
            "times of different days only beside it.", ""]


def with_retransmits(table: str, summary: list[dict]) -> str:
    line = retransmit_line(summary)
    return table if line is None else f"{table}\n\n{line}"


def burst_detail(link: dict) -> str:
    """The links' tbf burst, for runs that recorded it (messages under it pass unshaped)."""
    burst = link.get("burst_bytes")
    return "" if burst is None else f"; tbf burst {burst / 1024:g} KiB"


def probe_detail(link: dict) -> str:
    """How a link rate was read: the fastest of the probe's all-reduces (testbed.link_rate);
    older JSON files took the median, and say nothing more."""
    if "fastest_s" not in link:
        return ""
    return (f" (the fastest of {len(link['seconds'])} all-reduces of "
            f"{link['bytes'] / 1e6:g} MB; their median "
            f"{link['median_bits_per_s'] / 1e9:.3f} Gbit/s)")


def is_testbed(saved: dict) -> bool:
    """Whether a step-time run's JSON is a testbed run (else loopback)."""
    return bool(saved["links"]) or "--testbed" in saved["command"].split()


def markdown_body(saved: dict, table: str, pngs, docdir) -> str:
    """The markdown block of a step-time run, from its JSON (`saved`: its command, plan,
    links and environment), its rendered table and the paths of its plots."""
    command, plan, links, testbed = saved["command"], saved["plan"], saved["links"], is_testbed(saved)
    env = saved.get("environment") or {"date": "?", "commit": "?", "torch": "?", "cpus": "?",
                                       "loadavg": [float("nan")]}
    load_end = env.get("loadavg_end", [float("nan")])[0]
    where = ("the namespace testbed" if testbed else "loopback, 2 gloo ranks")
    bucket_mb = plan["configs"][0].get("bucket_mb", DEFAULT_BUCKET_MB) if plan.get("configs") else DEFAULT_BUCKET_MB
    lines = [f"### {'Testbed' if testbed else 'Loopback'}", "",
             f"Command: `{command}` ({where}; {env['date']}, commit {env['commit']}, "
             f"torch {env['torch']}, {env['cpus']} CPUs, load average "
             f"{env['loadavg'][0]:.1f} at the start, "
             f"{load_end:.1f} at the end; the "
             "machine is shared, so the load says how much to trust the times)", ""]
    lines += cpu_reference_lines(env)
    common = (f"Real DDP steps of torchvision models (10 classes), batch {plan['batch']} per "
              f"rank at {plan['image_size']} px, random data; {plan['steps']} timed steps "
              f"after {plan['warmup']} warm-up step(s), {plan['repeats']} interleaved rounds "
              "over all hooks; medians. `payload` is what the hook hands to "
              "`torch.distributed.all_reduce` per step (DDP's built-in all-reduce: every "
              "gradient); `of dense` divides by the fp32 gradient bytes.")
    if testbed:
        powersgd = any(c["hook"].startswith("powersgd") for c in plan.get("configs", []))
        lines += [
            "Links: `launch/testbed/` (a network namespace per node behind a bridge, tbf on "
            "both veth ends of every link; no added latency, netem is unavailable). " + common,
            ("PowerSGD runs in a single DDP bucket (PyTorch's PowerSGD hook issues its second "
             "all-reduce from a callback, which crashes gloo with several buckets), "
             "start_powerSGD_iter=2, error feedback and warm start on; the others use DDP "
             f"buckets of {bucket_mb:g} MB. " if powersgd else f"DDP buckets of {bucket_mb:g} MB. ")
            + "`wire` is what the node's eth0 sent per step (headers included). "
            "`all-reduce s at link` = payload x 2(n-1)/n over the measured gloo rate below; "
            "`step / limit` = step time over max(compute alone, that). `step / DDP bound` = "
            "step time over max(compute alone, forward + all-reduce at link + optimizer step): "
            "DDP reduces during backward only, so the forward and the optimizer step (timed "
            "within the compute-alone steps) cannot overlap the transfer.", ""]
        for k, v in links.items():
            lines.append(f"- gloo all-reduce rate measured on the testbed, {k}: "
                         f"{v['link_bits_per_s'] / 1e9:.3f} Gbit/s per link" + probe_detail(v)
                         + burst_detail(v))
        lines.append("")
    else:
        lines += [common + " The link is loopback: the bytes are exact, the step times are "
                  "not those of a slow network. `hook s` is the hook's own work per step "
                  "(its body: cast/pack/launch, plus the sparse hook's scatter-back).", ""]
    lines += [table, ""]
    for p in pngs:
        rel = os.path.relpath(p, docdir)
        lines.append(f"![{p.stem}]({rel})")
    return "\n".join(lines)


def tta_markdown(saved: dict, plan, summary: list[dict], table: str, target: float, png: Path | None,
                 docdir: Path) -> str:
    """The markdown block of a time-to-accuracy run from its JSON (`saved`: command,
    environment, link; `plan`: its TtaPlan) at `target`."""
    command, env, link = saved["command"], saved["environment"], saved["link"]
    width = plan.width
    name = plan.model if width is None else f"{plan.model} width {width}"
    load_end = env.get("loadavg_end", [float("nan")])[0]
    flag = ("" if width is None else f" --width {width}") \
        + ("" if plan.image_size is None else f" --image-size {plan.image_size}") \
        + ("" if plan.lr is None else f" --lr {plan.lr:g}")
    lines = [
        "### Time to accuracy" + ("" if (plan.model, width) == ("cnn", None) else f", {name}"), "",
        f"Command: `{command}` ({env['date']}, commit {env['commit']}, {env['cpus']} CPUs, "
        f"load average {env['loadavg'][0]:.1f} at the start, "
        f"{load_end:.1f} at the end)", "", *cpu_reference_lines(env),
        f"`approxdist-train --model {plan.model}{flag} --dataset digits --epochs {plan.epochs} "
        f"--batch-size {plan.batch} --eval-every {plan.eval_every}` under torchrun on 2 testbed "
        f"nodes at {plan.rate} (gloo all-reduce measured at "
        f"{link['link_bits_per_s'] / 1e6:.0f} Mbit/s{burst_detail(link)}), {plan.repeats} interleaved rounds. "
        f"`training s to {target:g}%` is approxdist-train's training clock (the steps "
        "with their transfers, without the evaluations and checkpoints) at the first "
        f"evaluation (every {plan.eval_every} steps and at each epoch's end) whose test top-1 "
        f"reaches {target:g}%, median over the runs that reached it; `speedup` compares "
        "it with DDP's all-reduce. `s from launch` also counts process start, dataset "
        "load, rendezvous and the evaluations, alike for every hook."
        + (" PowerSGD: rank 1, 2 warm-up steps of plain all-reduce."
           if any(s["hook"].startswith("powersgd") for s in summary) else ""), "",
        table, ""]
    if png:
        lines.append(f"![{png.stem}]({os.path.relpath(png, docdir)})")
    return "\n".join(lines)
