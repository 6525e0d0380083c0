"""`approxdist-bench compute` end to end on its smallest setting: the JSON it writes has
one row per case with a speedup and a selection share for each ratio, consistent with
the times it reports. (The figures themselves belong in docs/benchmarks.md, not here.)"""
import json

import pytest
import torch

from approxdist.bench import compute


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --threads sets it for the whole process


def test_compute_bench_writes_consistent_rows(tmp_path, capsys, keep_threads):
    out = tmp_path / "c.json"
    assert compute.main(["--only", "convs", "--kernels", "1", "--repeats", "1", "--warmup", "0",
                         "--ratios", "0.5", "0.25", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["threads"] == 1 and data["env"]["repeats"] == 1
    assert [r["case"] for r in data["rows"]] == [f"conv 1x1 {name}" for name, *_ in compute.CONV_SHAPES]
    for row in data["rows"]:
        assert [a["ratio"] for a in row["approx"]] == [0.5, 0.25]
        for a in row["approx"]:
            assert a["seconds"] > 0 and a["selection_seconds"] > 0
            assert a["speedup"] == pytest.approx(row["exact_seconds"] / a["seconds"])
            assert a["selection_share"] == pytest.approx(a["selection_seconds"] / a["seconds"])
    printed = capsys.readouterr().out
    assert "ratio 0.5" in printed and "conv 1x1 512ch 7x7 b32" in printed


def test_compute_bench_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        compute.main(["--repeats", "0"])


def test_compute_bench_distributed_times_the_distributed_defaults(tmp_path, capsys, keep_threads):
    out = tmp_path / "c.json"
    assert compute.main(["--only", "convs", "--kernels", "1", "--repeats", "1", "--warmup", "0",
                         "--ratios", "0.5", "--threads", "1", "--distributed", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["distributed"] is True
    for row in data["rows"]:
        (a,) = row["approx"]
        assert a["seconds"] > 0 and a["selection_seconds"] is None and a["selection_share"] is None
    printed = capsys.readouterr().out
    assert "mode weight_grad" in printed and "    -" in printed
