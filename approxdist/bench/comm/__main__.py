"""`python -m approxdist.bench.comm`: the ranks of a testbed run start this way (`_worker`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
