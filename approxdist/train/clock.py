"""The training clock: wall time spent training, without evaluations and checkpoints.

Time to accuracy is read on it (`train_seconds` in metrics.jsonl): how often a run
evaluates or checkpoints must not change how long it took to train. It runs from the
first step of an epoch to the last one's end, the last step's gradient transfer
included, and it is saved in the checkpoint, so a resumed run goes on counting where
the interrupted one stopped (the time lost to the interruption is not in it).
"""
import contextlib
import time

__all__ = ["TrainClock"]


class TrainClock:
    def __init__(self, seconds: float = 0.0, now=time.perf_counter):
        if not seconds >= 0.0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._total = float(seconds)
        self._since = None
        self._now = now

    @property
    def running(self) -> bool:
        return self._since is not None

    @property
    def seconds(self) -> float:
        """Training time so far, the current stretch included."""
        return self._total + (self._now() - self._since if self._since is not None else 0.0)

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self._total += self._now() - self._since
            self._since = None

    @contextlib.contextmanager
    def paused(self):
        """Stop the clock for the block (an evaluation, a checkpoint), then go on."""
        was_running = self.running
        self.stop()
        try:
            yield self
        finally:
            if was_running:
                self.start()
