"""Entry point of `approxdist-train` and `python -m approxdist.train`."""
import sys


def cli(argv=None, *, callbacks=()):
    """Parse, validate, train. Bad flags, unusable data and unusable checkpoints end in one
    line on stderr and status 2, a diverged run (non-finite loss) in one line and status 1;
    nothing else is caught, so a real failure keeps its traceback.
    callbacks: passed to the Trainer (each `fn(trainer, step)` after every step); a test
    entry point uses them, the command line has none."""
    from .args import fail, parse_args
    from .checkpoint import CheckpointError
    from .loop import NonFiniteLoss

    args = parse_args(argv)
    from .train import main

    try:
        main(args, callbacks=callbacks)
    except (ValueError, CheckpointError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except NonFiniteLoss as exc:  # not a usage error: the run started and diverged
        fail(str(exc), status=1)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
