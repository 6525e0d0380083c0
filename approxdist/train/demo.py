"""`make demo`: the small CNN on sklearn's digits, 2 processes, distributed approximate
layers with their defaults (half the channels' weight gradients, `topk_explore`) and the
sparse all-reduce hook.

    torchrun --standalone --nproc-per-node 2 -m approxdist.train.demo

Prints the test accuracy and how many gradient bytes the sparse hook sent against what a
dense all-reduce of the same gradients would have sent. Any approxdist-train flag given
after the command overrides the demo's choice (e.g. ``--sample-ratio 0.33``).
"""
import os
import sys

DEMO_FLAGS = [
    "--model", "cnn",
    "--dataset", "digits",
    "--epochs", "10",
    "--batch-size", "32",
    "--lr", "0.1",
    "--sample-ratio", "0.5",
    "--comm-hook", "sparse",
    "--no-progress",
]


def main(argv=None):
    from .args import parse_args
    from .logs import human_bytes
    from .train import main as train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(DEMO_FLAGS + argv)
    metrics = train_main(args)
    sent, dense = metrics.get("payload_bytes_total"), metrics.get("dense_bytes_total")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"demo: test accuracy {metrics['top1']:.2f}% top-1 on {metrics['val_samples']} held-out digits "
          f"({args.epochs} epochs, sample ratio {args.sample_ratio}, comm hook {args.comm_hook})")
    if dense:
        saved = dense - sent
        print(f"demo: gradient bytes sent per rank {human_bytes(sent)} vs {human_bytes(dense)} dense all-reduce: "
              f"saved {human_bytes(saved)} ({100.0 * saved / dense:.1f}%)")
    else:
        print("demo: single process, nothing was communicated (run it under torchrun with 2 processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
