"""Python callbacks on collective futures, released before the interpreter exits.

`fut.then(fn)` on a gloo (or NCCL) future runs `fn` on the backend's worker thread, and
that thread also drops the last reference to `fn` after it has completed the child
future, which takes the GIL. DDP's backward returns as soon as the child future
completes, so a script that ends right after its last step (``dist.destroy_process_group()``
and return, without `shutdown_distributed`) can reach interpreter finalization while the
worker thread is still about to release `fn`. Python then ends that thread with
``pthread_exit``, whose unwinding meets a ``noexcept`` frame in the future's callback code:
``terminate called without an active exception``, SIGABRT, in about 1 run in 15 of a
5-step script (PyTorch's own Python comm hooks carry the same race).

So every hook callback of this package goes through `then`: it records the callback (and
keeps the parent and child futures referenced from Python, so that the worker thread
never drops the last reference to one of them either), and an `atexit` handler, which
runs while the interpreter is still whole, waits with the GIL released until each
callback whose collective has completed has been released by its thread.
"""
import atexit
import threading
import time
import weakref

__all__ = ["then", "drain", "pending", "EXIT_WAIT_S"]

# How long interpreter exit waits for callbacks whose collective has not completed (a
# peer that died or hangs): their release may never come, and exit must not hang on it.
EXIT_WAIT_S = 5.0


class _Record:
    __slots__ = ("parent", "child", "released", "ref")

    def __init__(self, parent):
        self.parent = parent
        self.child = None
        self.released = False
        self.ref = None


_lock = threading.Lock()
_records = []
_atexit_installed = False


def _install_atexit():
    global _atexit_installed
    with _lock:
        if _atexit_installed:
            return
        _atexit_installed = True
    atexit.register(drain)


def _purge():
    """Forget the records of released callbacks (the main thread dropping the futures is
    safe while the interpreter runs: at worst a worker thread then waits for the GIL)."""
    with _lock:
        _records[:] = [r for r in _records if not r.released]


def then(fut, fn):
    """``fut.then(fn)``, tracked so that interpreter exit waits for `fn`'s release."""
    _install_atexit()
    _purge()
    record = _Record(fut)

    def callback(f):
        return fn(f)

    def on_release(_ref, record=record):
        record.released = True  # runs on the thread that dropped the callback, GIL held

    record.ref = weakref.ref(callback, on_release)
    with _lock:
        _records.append(record)
    record.child = fut.then(callback)
    return record.child


def pending() -> int:
    """How many tracked callbacks have not been released yet."""
    with _lock:
        return sum(not r.released for r in _records)


def drain(timeout: float = EXIT_WAIT_S) -> bool:
    """Wait (sleeping, so the GIL is free) until every tracked callback whose collective
    has completed is released, and at most `timeout` seconds for the others. Returns
    True when none is left. The records stay referenced: dropping the futures here could
    hand their last reference back to a worker thread that has not finished with them."""
    start = time.monotonic()
    while True:
        with _lock:
            waiting = [r for r in _records if not r.released]
        if not waiting:
            return True
        waited = time.monotonic() - start
        # (a completed collective's callback is released within microseconds; the cap
        # only guards against a future that completes without running its callbacks)
        if waited >= timeout and (waited >= 6 * timeout or not any(r.parent.done() for r in waiting)):
            return False
        time.sleep(0.001)
