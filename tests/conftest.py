"""Fixtures shared by several test files."""
import pytest
import torch

# What a launcher sets; a test that runs the training app in this process must not inherit them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                 "LOCAL_WORLD_SIZE")


@pytest.fixture
def single_process(monkeypatch):
    """The training app in this process, as one process with one thread: no launcher
    variables, torch's thread count restored afterwards."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
