"""PyTorch Lightning: a DDP strategy that registers the sparse hook on every device, and a
callback that logs what the hook sent.

Lightning's own `DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)` registers a comm hook
only when the root device is CUDA: on the CPU (gloo) the hook is silently left out, DDP
runs its default all-reduce and `state.stats` stays at 0 steps. `SparseDDPStrategy` calls
`approxdist.distributed.register` on the DDP-wrapped module whatever the device.

    model = MyLightningModule()          # converts its network: ad.convert_model(net, 0.33, distributed=True)
    strategy = SparseDDPStrategy()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                        callbacks=[SparseHookStats()])
    trainer.fit(model)
    strategy.sparse_state.stats          # steps, payload_bytes, dense_bytes, ...
"""
try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # the standalone package has the same classes
    try:
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.strategies import DDPStrategy
    except ImportError:
        raise ImportError("approxdist.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'approxdist[lightning]' (or pip install lightning)") from None

import approxdist as ad

# What the sparse hook's stats hold that a logger can plot (the rest are seconds and counts
# of internal calls).
LOGGED_STATS = ("steps", "payload_bytes", "dense_bytes", "ratio", "saved_bytes", "check_bytes")


class SparseDDPStrategy(DDPStrategy):
    """DDPStrategy that registers approxdist's sparse all-reduce hook on CPU and GPU alike.

    state: a `SparseAllReduceState` (default: a new one, agreement "local");
    compress: None, "fp16" or "bf16" (as `register`). Other keyword arguments go to
    DDPStrategy (and on to DistributedDataParallel: bucket_cap_mb, static_graph, ...).
    The model's sampled layers come from `ad.convert_model(..., distributed=True)` inside
    the LightningModule. After setup the registered state is `self.sparse_state`."""

    strategy_name = "approxdist_ddp"

    def __init__(self, *args, state=None, compress=None, **kwargs):
        for name in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not with SparseDDPStrategy, which registers approxdist's sparse "
                                 f"hook itself (pass state= and compress= instead)")
        if compress not in (None, *ad.distributed.COMPRESS):
            raise ValueError(f"compress: expected None or one of {', '.join(ad.distributed.COMPRESS)}, "
                             f"got {compress!r}")
        super().__init__(*args, **kwargs)
        self.sparse_state = state if state is not None else ad.distributed.SparseAllReduceState()
        self._compress = compress

    def configure_ddp(self):
        # DDPStrategy wraps the module and registers its own hooks (none: no ddp_comm_hook
        # is given); the sparse hook goes on the DDP module it made, whatever the device.
        super().configure_ddp()
        self.sparse_state = ad.distributed.register(self.model, self.sparse_state, compress=self._compress)


def _state_of(trainer):
    state = getattr(trainer.strategy, "sparse_state", None)
    if state is not None:
        return state
    # A stock DDPStrategy given the hook: its state, so that the 0 steps show in the logs.
    return getattr(trainer.strategy, "_ddp_comm_state", None)


class SparseHookStats(Callback):
    """Logs the sparse hook's cumulative `stats` (steps, payload_bytes, dense_bytes, ratio,
    saved_bytes, check_bytes) to the trainer's loggers as `<prefix>/<name>`: every
    `every_n_steps` optimizer steps (default: the Trainer's `log_every_n_steps`) and at
    the end of each training epoch. Rank 0 logs; the figures are the same on every rank."""

    def __init__(self, every_n_steps=None, prefix="sparse_hook"):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps: expected None or an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.last = None  # the last figures logged (a dict), for code that reads them back
        self._logged_step = None

    def metrics(self, trainer):
        state = _state_of(trainer)
        if state is None or not hasattr(state, "stats"):
            return None
        stats = state.stats
        return {f"{self.prefix}/{name}": stats[name] for name in LOGGED_STATS}

    def _log(self, trainer):
        metrics = self.metrics(trainer)
        if metrics is None or (trainer.global_step, metrics) == (self._logged_step, self.last):
            return  # (the same step again: batches accumulated under no_sync, or the epoch's end)
        self.last, self._logged_step = metrics, trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._log(trainer)


__all__ = ["SparseDDPStrategy", "SparseHookStats", "LOGGED_STATS"]
