"""approxdist-train with a worker that dies: the entry point of the elastic-restart test.

Run under torchrun as a script in place of `-m approxdist.train`. KILL_AT="RANK:STEP" makes
that rank SIGKILL itself right after global step STEP (after the step's checkpoint, if
one is due), on the first attempt only, so torchrun's restart then finishes the run.
The product carries no such code: this passes a callback to the Trainer.
"""
import os
import signal
import sys

KILL_AT = "APPROXDIST_TEST_KILL_AT"


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
    return cli(callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
