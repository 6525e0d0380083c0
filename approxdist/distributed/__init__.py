"""Distributed part: the sparse all-reduce DDP communication hook, its state, index
agreement across ranks, communication accounting and process-group initialisation.

What the training application and the benchmarks use is exported here (train/ and bench/
import nothing else from this package): the hook and its wrappers, the payload protocol
that lets forward_overlap split a bucket (`payload_of`, `with_payload`), and the defaults
their command lines show (`EAGER_FRACTION`, `COMPRESS`)."""
from .compress import COMPRESS, compress_wrapper
from .env import init_distributed, shutdown_distributed
from .forward_overlap import EAGER_FRACTION, finish_steps, forward_overlap
from .hook import SparseAllReduceState, register, sparse_allreduce_hook
from .overlap import in_hook_steps, optimizer_wrapper
from .payload import Payload, PayloadHook, payload_of, with_payload
from .watchdog import CollectiveTimeoutError, collective_timeout, naming_unresponsive_ranks

__all__ = ["SparseAllReduceState", "sparse_allreduce_hook", "register", "init_distributed",
           "shutdown_distributed",
           "optimizer_wrapper", "in_hook_steps", "forward_overlap", "finish_steps",
           "compress_wrapper", "COMPRESS", "EAGER_FRACTION",
           "Payload", "PayloadHook", "payload_of", "with_payload",
           "CollectiveTimeoutError", "collective_timeout", "naming_unresponsive_ranks"]
