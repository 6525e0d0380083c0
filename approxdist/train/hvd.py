"""`approxdist-train --dist horovod`: Horovod, not torch.distributed, reduces the gradients.

`horovodrun` (or `mpirun`) starts the processes; there is no process group and no DDP.
The optimizer is wrapped instead: `approxdist.horovod.DistributedOptimizer` for
``--comm-hook sparse`` (only the sampled channels travel), Horovod's own
`hvd.DistributedOptimizer` for ``allreduce`` and ``fp16`` (its fp16 compression). The
counters come as a `comm.Comm` (sparse) or a `HorovodComm` of the same form, so the epoch
lines and checkpoints look the same as under torchrun.
"""
from .comm import Comm

HOOKS = ("allreduce", "fp16", "sparse")


def horovod_module():
    """horovod.torch, or a ValueError (a bad flag, reported before anything starts) that
    says how to install it."""
    from approxdist.distributed.horovod import load_horovod

    try:
        return load_horovod()
    except ImportError as exc:
        raise ValueError(f"--dist horovod: {exc}") from exc


def check_args(args):
    """The flag combinations Horovod can run; raises ValueError naming the flag."""
    if args.comm_hook not in HOOKS:
        raise ValueError(f"--comm-hook {args.comm_hook} is not available with --dist horovod; "
                         f"choose one of {', '.join(HOOKS)}")
    if args.agreement == "broadcast":
        raise ValueError("--agreement broadcast is not available with --dist horovod; use local or check")
    if getattr(args, "weight_layout", None) == "input_major":
        raise ValueError("--weight-layout input_major is not available with --dist horovod: Horovod's "
                         "broadcast and all-reduce need contiguous weights (the default there)")
    if args.backend is not None:
        raise ValueError("--backend selects the torch.distributed backend; Horovod picks its own "
                         "(horovodrun --gloo or --mpi)")
    horovod_module()


def init():
    """hvd.init(); (rank, world_size, local_rank)."""
    hvd = horovod_module()
    hvd.init()
    return hvd.rank(), hvd.size(), hvd.local_rank()


def sum_across_ranks(t):
    hvd = horovod_module()
    return hvd.allreduce(t, op=hvd.Sum, name="approxdist.train.sum")


class HorovodComm:
    """Counters of Horovod's own optimizer, in the form of `comm.Comm`: every step sends
    every gradient (half the bytes with fp16). The sparse optimizer keeps its counters in
    a `SparseAllReduceState`, which `comm.Comm` already reports and checkpoints."""

    def __init__(self, name, optimizer, dense_bytes_per_step):
        self.name = name
        self.dense_per_step = dense_bytes_per_step
        self.steps = 0
        self._depth = 0
        # Horovod's optimizer subclasses the wrapped one and both step()s run the hooks:
        # count the outermost call only.
        optimizer.register_step_pre_hook(self._enter)
        optimizer.register_step_post_hook(self._leave)

    def _enter(self, *_):
        self._depth += 1
        if self._depth == 1:
            self.steps += 1

    def _leave(self, *_):
        self._depth -= 1

    def stats(self):
        dense = self.steps * self.dense_per_step
        return {"steps": self.steps, "payload_bytes": dense // 2 if self.name == "fp16" else dense,
                "dense_bytes": dense}

    def state_dict(self):
        return {"counters": {"steps": self.steps}}

    def load_state_dict(self, data):
        if data:
            self.steps = int(data["counters"]["steps"])


def wrap(model, optimizer, args):
    """Broadcast rank 0's parameters, wrap the optimizer; (optimizer, its counters)."""
    import approxdist

    hvd = horovod_module()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    named = list(model.named_parameters())
    if args.comm_hook == "sparse":
        optimizer = approxdist.horovod.DistributedOptimizer(optimizer, named_parameters=named,
                                                            agreement=args.agreement)
        return optimizer, Comm("sparse", optimizer.sparse_state, "sparse")
    compression = hvd.Compression.fp16 if args.comm_hook == "fp16" else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=named, compression=compression)
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return optimizer, HorovodComm(args.comm_hook, optimizer, dense)


__all__ = ["HOOKS", "check_args", "init", "wrap", "sum_across_ranks", "HorovodComm"]
