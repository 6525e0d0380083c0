"""Entry point of `approxdist-train` and `python -m approxdist.train`."""
import sys


def cli(argv=None):
    """Parse, validate, train. Bad flags and unusable checkpoints end in one line on stderr
    and status 2; nothing else is caught, so a real failure keeps its traceback."""
    from .args import fail, parse_args
    from .checkpoint import CheckpointError

    args = parse_args(argv)
    from .train import main

    try:
        main(args)
    except (ValueError, CheckpointError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
