"""The demo's analytic MAC count and a short run of it on the real digits."""
import pytest
import torch

from approxdist import convert_model
from approxdist.demo import DigitsCNN, count_macs, run_demo

# per sample, by hand: conv1 8*8 px * 32 out * 1 in * 9, conv2 8*8 * 64 * 32 * 9,
# conv3 4*4 * 64 * 64 * 9, fc1 128 * 256, fc2 10 * 128
EXACT = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 4 * 4 * 64 * 64 * 9 + 128 * 256 + 10 * 128
# at sample_ratio 0.5 the sampled layers keep half their input channels; conv1 stays exact
HALF = 8 * 8 * 32 * 9 + (8 * 8 * 64 * 32 * 9 + 4 * 4 * 64 * 64 * 9 + 128 * 256 + 10 * 128) // 2


def test_count_macs_by_hand():
    x = torch.randn(3, 1, 8, 8)
    model = DigitsCNN()
    assert count_macs(model, x) == (EXACT, EXACT)
    convert_model(model, 0.5)
    assert count_macs(model, x) == (EXACT, HALF)
    model.train()
    count_macs(model, x)
    assert model.training  # the count leaves the mode as it was


def test_demo_trains_both_variants():
    pytest.importorskip("sklearn")
    results = run_demo(sample_ratio=0.5, epochs=2, verbose=False)
    for name in ("exact", "approx"):
        assert results[name]["test_accuracy"] > 0.8  # ten classes: chance is 0.1
    assert results["approx"]["macs_saved"] == pytest.approx(1 - HALF / EXACT)
    assert results["exact"]["macs_saved"] == 0


def test_demo_restores_the_thread_count():
    pytest.importorskip("sklearn")
    before = torch.get_num_threads()
    run_demo(epochs=1, threads=1, verbose=False)
    assert torch.get_num_threads() == before
