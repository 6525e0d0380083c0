"""Issue #6's targets for 2 nodes at 1gbit, resnet18, run by run, from the JSON files
that `approxdist-bench comm --testbed ... --json F` writes.

    python experiments/tools/testbed_targets.py docs/comm_testbed*.json experiments/runs/comm_testbed*.json

A run counts when its file holds the 2-node, 1gbit resnet18 rows a target needs; the
others are listed as skipped. Per run it reads the run's own rows (medians of its
interleaved rounds) and checks:
  2.5x    sparse 0.33 steps at least 2.5x faster than DDP's all-reduce (plain: both
          in the usual loop; +overlap: sparse 0.33 with the next forward overlapping the
          transfer, against the plain all-reduce, which is what a user runs without us)
  15%     sparse 0.33's step within 15% of its physical limit (step / limit <= 1.15,
          limit = max(compute alone, payload at the measured link rate))
  fp16    sparse 0.5 at least as fast as fp16, the same bytes (plain against plain,
          +overlap against fp16 +overlap)
  bytes   every sparse row's payload equals its analytic minimum
The machine's speed moves these: the CPU reference (`approxdist-bench cpu`, recorded
before each run since 2026-12-02 and after it since that evening) says how fast it was.
A diagnostic for experiments/records, not a benchmark: it runs nothing.
"""
import argparse
import json
import sys
from pathlib import Path

SPEEDUP = 2.5
WITHIN = 1.15


def _rows(data: dict) -> dict:
    """hook -> summary row of the 2-node 1gbit resnet18 rows."""
    return {s["hook"]: s for s in data.get("summary", [])
            if s.get("nodes") == 2 and s.get("rate") == "1gbit" and s.get("model") == "resnet18"}


def verdicts(data: dict) -> dict | None:
    """The targets of one run; None when it lacks DDP's all-reduce or sparse 0.33."""
    rows = _rows(data)
    base, s33 = rows.get("allreduce"), rows.get("sparse0.33")
    if base is None or s33 is None:
        return None
    env = data.get("environment") or {}
    ref = env.get("cpu_reference") or {}
    ref_end = env.get("cpu_reference_end") or {}
    buckets = {c.get("bucket_mb") for c in data.get("plan", {}).get("configs", [])
               if c.get("model") == "resnet18" and not c["hook"].startswith("powersgd")}
    out = {"date": env.get("date"), "commit": env.get("commit"),
           "cpu_reference_ms": ref.get("alone_ms"), "cpu_reference_end_ms": ref_end.get("alone_ms"),
           "bucket_mb": buckets.pop() if len(buckets) == 1 else None,
           "allreduce_s": base["step_s"],
           "sparse033_s": s33["step_s"], "sparse033_x": base["step_s"] / s33["step_s"],
           "sparse033_of_limit": s33["of_limit"]}
    over = rows.get("sparse0.33+overlap")
    if over is not None:
        out.update(overlap_s=over["step_s"], overlap_x=base["step_s"] / over["step_s"],
                   overlap_of_limit=over["of_limit"])
    for loop, suffix in (("plain", ""), ("overlap", "+overlap")):
        s5, f16 = rows.get("sparse0.5" + suffix), rows.get("fp16" + suffix)
        if s5 is not None and f16 is not None:
            out[f"sparse05_{loop}_s"], out[f"fp16_{loop}_s"] = s5["step_s"], f16["step_s"]
    sparse = [s for s in data.get("summary", []) if s.get("kind") == "sparse" and "analytic_bytes" in s]
    out["bytes_at_minimum"] = (all(s["payload_bytes"] == s["analytic_bytes"] for s in sparse)
                               if sparse else None)
    return out


def _mark(ok) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def table(runs: list[tuple[str, dict]]) -> str:
    """A markdown table of the runs' verdicts and a last line that counts them."""
    lines = ["| run | CPU ref ms (before / after) | buckets MB | all-reduce s | sparse 0.33 s (x) | +overlap s (x) "
             "| 0.33 >= 2.5x plain / +overlap | 0.33 step/limit plain / +overlap | within 15% "
             "| sparse 0.5 / fp16 s plain; +overlap | 0.5 >= fp16 | bytes at minimum |",
             "|" + "---|" * 12]
    count = {"x_plain": 0, "x_overlap": 0, "limit": 0, "fp16": 0, "runs_overlap": 0, "runs_fp16": 0}
    for name, v in runs:
        ref = f"{v['cpu_reference_ms']:.1f}" if v["cpu_reference_ms"] else "-"
        if v.get("cpu_reference_end_ms"):  # runs since 2026-12-02 19:10 take it again at the end
            ref += f" / {v['cpu_reference_end_ms']:.1f}"
        bucket = f"{v['bucket_mb']:g}" if v["bucket_mb"] else "-"
        x_plain = v["sparse033_x"] >= SPEEDUP
        count["x_plain"] += x_plain
        overlap = "-"
        x_over = limit_over = None
        if "overlap_s" in v:
            count["runs_overlap"] += 1
            x_over, limit_over = v["overlap_x"] >= SPEEDUP, v["overlap_of_limit"] <= WITHIN
            count["x_overlap"] += x_over
            overlap = f"{v['overlap_s']:.3f} ({v['overlap_x']:.2f}x)"
        within = v["sparse033_of_limit"] <= WITHIN or bool(limit_over)
        count["limit"] += within
        limits = f"{v['sparse033_of_limit']:.2f} / " + (f"{v['overlap_of_limit']:.2f}" if "overlap_s" in v else "-")
        pairs, fp16_ok = [], None
        for loop in ("plain", "overlap"):
            if f"sparse05_{loop}_s" in v:
                ok = v[f"sparse05_{loop}_s"] <= v[f"fp16_{loop}_s"]
                fp16_ok = ok if fp16_ok is None else fp16_ok and ok
                pairs.append(f"{v[f'sparse05_{loop}_s']:.3f} / {v[f'fp16_{loop}_s']:.3f}")
        if fp16_ok is not None:
            count["runs_fp16"] += 1
            count["fp16"] += fp16_ok
        lines.append(f"| {v['date'] or '?'} {v['commit'] or ''} ({name}) | {ref} | {bucket} "
                     f"| {v['allreduce_s']:.3f} | {v['sparse033_s']:.3f} ({v['sparse033_x']:.2f}x) | {overlap} "
                     f"| {_mark(x_plain)} / {_mark(x_over)} | {limits} | {_mark(within)} "
                     f"| {'; '.join(pairs) or '-'} | {_mark(fp16_ok)} | {_mark(v['bytes_at_minimum'])} |")
    n = len(runs)
    lines.append("")
    lines.append(f"Of {n} runs: sparse 0.33 >= {SPEEDUP}x plain in {count['x_plain']}, with the overlap in "
                 f"{count['x_overlap']} of {count['runs_overlap']}; within {WITHIN - 1:.0%} of its limit "
                 f"(plain or with the overlap) in {count['limit']}; sparse 0.5 at least as fast as fp16 "
                 f"(in every loop the run has) in {count['fp16']} of {count['runs_fp16']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON files of approxdist-bench comm --testbed runs")
    a = p.parse_args(argv)
    runs, skipped = [], []
    for f in a.files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"files: cannot read {f}: {e}")
        v = verdicts(data) if isinstance(data, dict) else None
        if v is None:
            skipped.append(f)
        else:
            runs.append((Path(f).name, v))
    runs.sort(key=lambda r: r[1]["date"] or "")
    if runs:
        print(table(runs))
    for f in skipped:
        print(f"skipped {f}: no 2-node 1gbit resnet18 rows of DDP's all-reduce and sparse 0.33",
              file=sys.stderr)
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
