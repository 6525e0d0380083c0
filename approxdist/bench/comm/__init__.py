"""`approxdist-bench comm`: what the sparse all-reduce hook saves, next to what users would
use instead (DDP's all-reduce, fp16 compression, PowerSGD).

Two modes:
- loopback (default): 2 gloo ranks on this machine (torch.multiprocessing); payload bytes
  per step of the sparse hook vs dense vs fp16, and the hook's share of the step time.
  The link is loopback, so the times say little about slow networks; the bytes are exact.
- `--testbed`: the same DDP steps on a namespace testbed (approxdist.bench.testbed) with
  tbf-shaped links, 2 and 4 nodes at 1gbit and 100mbit, every hook interleaved with the
  others and repeated, so a slow spell of the machine does not favour one.
And `--testbed --time-to-accuracy` (tta.py): approxdist-train to a fixed test accuracy.

A run writes JSON and PNG plots; `--render F.json --markdown docs/benchmarks.md` writes
the docs' block from a saved run. The modules follow the pipeline:
specs (the options, typed) -> hooks (what is installed on DDP) -> worker (one rank's timed
steps, and how ranks are started) -> summary (medians, speedups, limits) -> report and
plots (tables, markdown, figures) -> cli (the flags). Only the standard library is
imported here; torch comes with the first run.
"""
from .cli import main, parser
from .hooks import Built, analytic_payload_bytes, build, dense_payload_bytes, make_model
from .plots import plot
from .report import format_table, markdown_body, probe_detail, retransmit_line, write_markdown_section
from .specs import HookSpec, Plan, RunConfig, TtaPlan, parse_hook
from .summary import summarize
from .worker import free_port, run_loopback, run_on_testbed, run_plan

__all__ = ["main", "parser", "parse_hook", "HookSpec", "RunConfig", "Plan", "TtaPlan", "Built", "build",
           "make_model", "analytic_payload_bytes", "dense_payload_bytes", "run_plan", "run_loopback",
           "run_on_testbed", "free_port", "summarize", "format_table", "retransmit_line", "markdown_body",
           "probe_detail", "write_markdown_section", "plot"]
