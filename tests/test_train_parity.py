"""Accuracy parity (slow, run on purpose; figures in docs/benchmarks.md, "Training"):
the digits CNN on 2 ranks, exact vs sample ratio 0.5 and 0.33 with the sparse hook, same
epochs and seed, ends within 1 point of the exact run's test accuracy."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--dataset", "digits", "--model", "cnn", "--epochs", "10", "--batch-size", "32", "--lr", "0.1",
          "--seed", "0", "--no-progress"]
CONFIGS = {"exact": ["--sample-ratio", "1", "--comm-hook", "allreduce"],
           "0.5": ["--sample-ratio", "0.5", "--comm-hook", "sparse"],
           "0.33": ["--sample-ratio", "0.33", "--comm-hook", "sparse"]}


def _final(out_dir, flags):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "approxdist.train", *COMMON, *flags, "--output-dir", out_dir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


@pytest.mark.slow
def test_digits_accuracy_parity(tmp_path):
    results = {name: _final(str(tmp_path / name), flags) for name, flags in CONFIGS.items()}
    summary = {name: (r["top1"], r["payload_bytes_total"], r["dense_bytes_total"]) for name, r in results.items()}
    print(json.dumps(summary))
    exact = results["exact"]["top1"]
    assert exact > 95.0, summary
    for name in ("0.5", "0.33"):
        assert abs(results[name]["top1"] - exact) <= 1.0, summary
        assert results[name]["payload_bytes_total"] < results["exact"]["payload_bytes_total"], summary
