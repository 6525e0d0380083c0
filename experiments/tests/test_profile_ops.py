"""experiments/tools/profile_ops.py: the exact-vs-approximate op profile experiments/records cites."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "experiments", "tools", "profile_ops.py")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_profiles_both_steps_and_only_the_approximate_one_gathers():
    r = _run("--image-size", "16", "--batch", "2", "--steps", "1",
             "--ops", "native_batch_norm,index_select,mkldnn_convolution")
    assert r.returncode == 0, r.stderr
    ops = ("native_batch_norm", "index_select", "mkldnn_convolution")
    rows = {f[0]: f[1:] for f in map(str.split, r.stdout.splitlines()) if f and f[0] in ops}
    assert set(rows) == set(ops)
    assert float(rows["native_batch_norm"][0]) > 0 and float(rows["native_batch_norm"][1]) > 0
    # the exact step selects nothing; the sampled layers gather their channels
    assert float(rows["index_select"][0]) == 0 and float(rows["index_select"][1]) > 0
    assert "BatchNorm inputs contiguous: exact True, approx True" in r.stdout


def test_bad_arguments_name_the_argument():
    for args, name in ((["--ratio", "0"], "--ratio"), (["--image-size", "-1"], "--image-size"),
                       (["--model", "nosuchnet"], "--model")):
        r = _run(*args)
        assert r.returncode == 2 and name in r.stderr, r.stderr
