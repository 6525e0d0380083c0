"""approxdist-train with a worker that dies: the entry point of the elastic-restart test.

Run under torchrun as a script in place of `-m approxdist.train`. KILL_AT="RANK:STEP" makes
that rank SIGKILL itself right after global step STEP (after the step's checkpoint, if
one is due), on the first attempt only, so torchrun's restart then finishes the run.
KILL_IN_SAVE="N" makes the process SIGKILL itself in the middle of writing its N-th
checkpoint (after some bytes of the temporary file), on the first attempt only.
The product carries no such code: this passes a callback to the Trainer, or wraps
torch.save in this process.
"""
import os
import signal
import sys

KILL_AT = "APPROXDIST_TEST_KILL_AT"
KILL_IN_SAVE = "APPROXDIST_TEST_KILL_IN_SAVE"


def kill_in_save(n):
    """Wrap torch.save so that its n-th call writes a few bytes and SIGKILLs this process."""
    import torch

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            f.write(b"the first bytes of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def kill_at(rank, step):
    """A Trainer callback: SIGKILL this process after global step `step` on rank `rank`."""
    def callback(trainer, at):
        if trainer.rank == rank and at == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def main():
    from approxdist.train.__main__ import cli
    from approxdist.train.trainer import restart_count

    callbacks = []
    spec = os.environ.get(KILL_AT)
    if spec and restart_count() == 0:
        rank, step = (int(x) for x in spec.split(":"))
        callbacks.append(kill_at(rank, step))
    spec = os.environ.get(KILL_IN_SAVE)
    if spec and restart_count() == 0:
        kill_in_save(int(spec))
    return cli(callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
