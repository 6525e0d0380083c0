"""Distributed part: the sparse all-reduce DDP communication hook, its state, index
agreement across ranks, communication accounting and process-group initialisation."""
from .compress import compress_wrapper
from .env import init_distributed, shutdown_distributed
from .forward_overlap import finish_steps, forward_overlap
from .hook import SparseAllReduceState, register, sparse_allreduce_hook
from .overlap import in_hook_steps, optimizer_wrapper

__all__ = ["SparseAllReduceState", "sparse_allreduce_hook", "register", "init_distributed",
           "shutdown_distributed",
           "optimizer_wrapper", "in_hook_steps", "forward_overlap", "finish_steps",
           "compress_wrapper"]
