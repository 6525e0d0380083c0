"""`approxdist-bench SUBCOMMAND [args]`: each subcommand is a module of this package
with a `main(argv)` function, so one benchmark's imports never slow another's start."""
import importlib
import sys

SUBCOMMANDS = {
    "compute": "approxdist.bench.compute",
    "kernels": "approxdist.bench.kernels",
    "comm": "approxdist.bench.comm",
    "testbed": "approxdist.bench.testbed",
    "cpu": "approxdist.bench.cpu_reference",
    "fidelity": "approxdist.bench.fidelity",
}


def cli(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        print(f"usage: approxdist-bench {{{names}}} [options]  (each takes --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(cli())
