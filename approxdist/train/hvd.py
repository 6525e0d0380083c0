"""`approxdist-train --dist horovod`: Horovod, not torch.distributed, reduces the gradients.

`horovodrun` (or `mpirun`) starts the processes; there is no process group and no DDP.
The optimizer is wrapped instead: `approxdist.horovod.DistributedOptimizer` for
``--comm-hook sparse`` (only the sampled channels travel), Horovod's own
`hvd.DistributedOptimizer` for ``allreduce`` and ``fp16`` (its fp16 compression). The
returned `HorovodComm` reports the same counters as `comm.Comm`, so the epoch lines and
checkpoints look the same as under torchrun.
"""
import torch

from .checkpoint import to_plain

HOOKS = ("allreduce", "fp16", "sparse")


def horovod_module():
    """horovod.torch, or a ValueError (a bad flag, reported before anything starts) that
    says how to install it."""
    from approxdist.distributed.horovod import INSTALL_HINT

    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or an extension built against another torch
        raise ValueError(f"--dist horovod: {INSTALL_HINT} (importing horovod.torch failed: {exc})") from exc
    return hvd


def check_args(args):
    """The flag combinations Horovod can run; raises ValueError naming the flag."""
    if args.comm_hook not in HOOKS:
        raise ValueError(f"--comm-hook {args.comm_hook} is not available with --dist horovod; "
                         f"choose one of {', '.join(HOOKS)}")
    if args.agreement == "broadcast":
        raise ValueError("--agreement broadcast is not available with --dist horovod; use local or check")
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
    """Counters of the wrapped optimizer: the sparse optimizer keeps its own; for Horovod's
    optimizer every step sends every gradient (half the bytes with fp16)."""

    def __init__(self, name, optimizer, dense_bytes_per_step):
        self.name, self.optimizer = name, optimizer
        self.dense_per_step = dense_bytes_per_step
        self.steps = 0
        self._depth = 0
        if name != "sparse":
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
        if self.name == "sparse":
            s = self.optimizer.stats
            return {"steps": int(s["steps"]), "payload_bytes": int(s["payload_bytes"]),
                    "dense_bytes": int(s["dense_bytes"])}
        dense = self.steps * self.dense_per_step
        return {"steps": self.steps, "payload_bytes": dense // 2 if self.name == "fp16" else dense,
                "dense_bytes": dense}

    def state_dict(self):
        if self.name == "sparse":
            return {"sparse": {"state_dict": to_plain(self.optimizer.sparse_state.state_dict())}}
        return {"counters": {"steps": self.steps}}

    def load_state_dict(self, data):
        if not data:
            return
        if self.name == "sparse":
            self.optimizer.sparse_state.load_state_dict(dict(data["sparse"]["state_dict"]))
        else:
            self.steps = int(data["counters"]["steps"])


def wrap(model, optimizer, args):
    """Broadcast rank 0's parameters, wrap the optimizer; (optimizer, HorovodComm)."""
    import approxdist

    hvd = horovod_module()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    named = list(model.named_parameters())
    if args.comm_hook == "sparse":
        optimizer = approxdist.horovod.DistributedOptimizer(optimizer, named_parameters=named,
                                                            agreement=args.agreement)
    else:
        compression = hvd.Compression.fp16 if args.comm_hook == "fp16" else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=named, compression=compression)
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return optimizer, HorovodComm(args.comm_hook, optimizer, dense)


__all__ = ["HOOKS", "check_args", "init", "wrap", "sum_across_ranks", "HorovodComm"]
