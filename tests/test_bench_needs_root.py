"""`approxdist-bench testbed` and `comm --testbed` need root and namespaces: without them they
say so in one line, before any work (no CPU reference, no model, no namespace)."""
import os

import pytest

from approxdist.bench import testbed
from approxdist.bench.comm import cli


@pytest.fixture
def not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 65534)

    def no_work(*a, **k):
        raise AssertionError("work started before the root check")

    monkeypatch.setattr(testbed, "Testbed", no_work)
    monkeypatch.setattr(cli, "environment", no_work)


@pytest.mark.parametrize("argv", [
    ["testbed"],
    ["comm", "--testbed", "--models", "resnet18", "--hooks", "allreduce"],
    ["comm", "--testbed", "--time-to-accuracy"],
])
def test_refused_up_front_without_root(not_root, capsys, argv):
    from approxdist.bench.__main__ import cli as bench

    assert bench(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "ip netns" in lines[0], out.err
    assert out.out == ""


def test_help_says_so(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "needs root" in " ".join(capsys.readouterr().out.split())
