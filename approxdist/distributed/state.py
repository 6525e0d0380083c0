"""State of the sparse all-reduce hook: configuration and communication accounting.

Like PyTorch's PowerSGDState it is picklable and drops the process group when pickled,
so it can travel in a checkpoint; the group is set again on the restored object (or left
None, meaning the default group)."""

import torch

AGREEMENTS = ("local", "check", "broadcast")


class SparseAllReduceState:
    """Configuration and counters of `sparse_allreduce_hook`.

    agreement: how ranks are kept on the same channels.
      "local"      trust that identical weights give identical selections (DDP keeps
                   weights identical), no extra traffic;
      "check"      every `check_every` steps compare a digest of every layer's indices
                   across ranks and raise on a mismatch, naming the first diverging layer;
      "broadcast"  every sampled layer uses rank 0's selection (one small broadcast per
                   layer per forward): safe even when weights drift apart.
    """

    __slots__ = ("process_group", "agreement", "check_every", "steps", "payload_bytes",
                 "dense_bytes", "buckets", "pack_seconds", "unpack_seconds", "checks",
                 "param_names", "_synced_layers", "_buffers")

    def __init__(self, process_group=None, *, agreement="local", check_every=100):
        if agreement not in AGREEMENTS:
            raise ValueError(f"agreement must be one of {', '.join(map(repr, AGREEMENTS))}; got {agreement!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
        self.process_group = process_group
        self.agreement = agreement
        self.check_every = check_every
        self.steps = 0
        self.payload_bytes = 0
        self.dense_bytes = 0
        self.buckets = 0
        self.pack_seconds = 0.0
        self.unpack_seconds = 0.0
        self.checks = 0
        self.param_names = {}  # id(weight) -> sampled layer's name, filled by register()
        self._synced_layers = set()  # ids of layers given the broadcast index sync
        # Packed buffers kept from step to step, one per bucket (keyed by its parameters):
        # a fresh tens-of-MB allocation each step costs more in page faults on the CPU than
        # packing it. Entry: key -> [tensor, last step used].
        self._buffers = {}

    def packed_buffer(self, params, numel, dtype, device):
        """A flat tensor of `numel` elements for the bucket holding `params`, reused from
        the previous step when it is large enough. DDP waits for every bucket's future
        before its backward returns, so no collective still reads it when it is reused."""
        key = (tuple(id(p) for p in params), dtype, str(device))
        entry = self._buffers.get(key)
        if entry is None or entry[0].numel() < numel:
            entry = self._buffers[key] = [torch.empty(numel, dtype=dtype, device=device), None]
        entry[1] = self.steps
        return entry[0].narrow(0, 0, numel)

    def release_unused_buffers(self):
        """Drops the buffers no bucket of this step used (DDP rebuilt its buckets, or the
        model changed); called after the step's last bucket."""
        for key in [k for k, (_, step) in self._buffers.items() if step != self.steps]:
            del self._buffers[key]

    @property
    def stats(self):
        """Cumulative counters: steps, payload_bytes (what the hook handed to all_reduce),
        dense_bytes (what the default hook would have sent), their ratio, and the hook's
        own pack/unpack seconds."""
        return {
            "steps": self.steps,
            "buckets": self.buckets,
            "payload_bytes": self.payload_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.payload_bytes / self.dense_bytes if self.dense_bytes else 1.0,
            "saved_bytes": self.dense_bytes - self.payload_bytes,
            "pack_seconds": self.pack_seconds,
            "unpack_seconds": self.unpack_seconds,
            "checks": self.checks,
        }

    def __getstate__(self):
        # Plain data only (no group, no parameter ids, which mean nothing in another
        # process), so the result also loads with torch.load(weights_only=True).
        keep = ("agreement", "check_every", "steps", "payload_bytes", "dense_bytes", "buckets",
                "pack_seconds", "unpack_seconds", "checks")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state):
        self.__init__(None, agreement=state["agreement"], check_every=state["check_every"])
        for name, value in state.items():
            if name not in ("agreement", "check_every"):
                setattr(self, name, value)

    def state_dict(self):
        return self.__getstate__()

    def load_state_dict(self, state):
        group, names = self.process_group, self.param_names
        self.__setstate__(state)
        self.process_group, self.param_names = group, names
