"""State of the sparse all-reduce hook: configuration and communication accounting.

Like PyTorch's PowerSGDState it is picklable and drops the process group when pickled,
so it can travel in a checkpoint; the group is set again on the restored object (or left
None, meaning the default group)."""

import torch
import torch.distributed as dist

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

    __slots__ = ("_process_group", "_agreement", "_check_every", "steps", "payload_bytes",
                 "dense_bytes", "buckets", "pack_seconds", "unpack_seconds", "checks", "check_bytes",
                 "param_names", "step_weights", "_seen_weights", "_sizes_step", "_synced_layers", "_buffers")

    def __init__(self, process_group=None, *, agreement="local", check_every=100):
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
        self.check_bytes = 0  # the size and index checks' small all-reduces (not payload)
        self.param_names = {}  # id(weight) -> sampled layer's name, filled by register()
        # (name, weight) of every sampled weight of the registered model, filled by
        # register() or learned by the hook in its first step: the payload sizes are then
        # compared once per step, at its first bucket, when nothing is queued on the
        # group yet (before every bucket until then).
        self.step_weights = ()
        self._seen_weights = {}  # id(weight) -> (name, weight), while learning them
        self._sizes_step = -1  # the step whose sizes were compared
        self._synced_layers = set()  # ids of layers given the broadcast index sync
        # Packed buffers kept from step to step, one per bucket (keyed by its parameters):
        # a fresh tens-of-MB allocation each step costs more in page faults on the CPU than
        # packing it. Entry: key -> [tensor, last step used].
        self._buffers = {}

    # The settings are validated on every assignment, not only in the constructor: a state
    # changed after construction must not run with a value the hook does not know.
    @property
    def process_group(self):
        return self._process_group

    @process_group.setter
    def process_group(self, value):
        if value is not None and not isinstance(value, dist.ProcessGroup):
            raise ValueError(f"process_group must be None (the default group) or a "
                             f"torch.distributed.ProcessGroup, got {value!r}")
        self._process_group = value

    @property
    def agreement(self):
        return self._agreement

    @agreement.setter
    def agreement(self, value):
        if value not in AGREEMENTS:
            raise ValueError(f"agreement must be one of {', '.join(map(repr, AGREEMENTS))}; got {value!r}")
        self._agreement = value

    @property
    def check_every(self):
        return self._check_every

    @check_every.setter
    def check_every(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {value!r}")
        self._check_every = value

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
        own pack/unpack seconds. check_bytes: what the checks that keep the ranks' payloads
        alike sent besides (16 bytes per sampled weight plus 16, once per step; in the
        first step of a hook registered without register(), per bucket that holds one;
        agreement 'check' a digest of 80 bytes per weight on its checked steps);
        payload_bytes does not include them."""
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
            "check_bytes": self.check_bytes,
        }

    def __getstate__(self):
        # Plain data only (no group, no parameter ids, which mean nothing in another
        # process), so the result also loads with torch.load(weights_only=True).
        keep = ("agreement", "check_every", "steps", "payload_bytes", "dense_bytes", "buckets",
                "pack_seconds", "unpack_seconds", "checks", "check_bytes")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state):
        self.__init__(None, agreement=state["agreement"], check_every=state["check_every"])
        for name, value in state.items():
            if name not in ("agreement", "check_every"):
                setattr(self, name, value)

    def state_dict(self):
        return self.__getstate__()

    def load_state_dict(self, state):
        group, names, weights = self.process_group, self.param_names, self.step_weights
        self.__setstate__(state)
        self.process_group, self.param_names, self.step_weights = group, names, weights
