"""Channel selection that every DDP rank agrees on without exchanging an index.

The selection depends only on the weights (identical on all ranks under DDP) and, for
'topk_explore' and 'bernoulli_weight', on a dedicated generator seeded identically on
every rank. Each layer records the channels its weight gradient can be non-zero on since
the hook last reduced it (a union, so gradient accumulation with no_sync stays lossless).

'topk_weight' (the classes' default) keeps the k channels of largest weight norm. An
unselected channel gets no gradient, so the selection settles into a sub-network. In mode
'forward' the training forward computes that sub-network only and the exact eval forward
adds the other channels back; in mode 'weight_grad' (convert_model's distributed default)
the forward is exact and the frozen channels stay at their initial values.
'topk_explore' (convert_model's distributed default) keeps the top (1 - explore) k channels
and fills the rest from a rotation: a permutation of all n channels, drawn once from the
seed, walked cyclically a few channels per training forward (skipping those already in
the top), so every channel is selected at least once per pass (about n / (explore * k)
forwards) and none stays untrained. The walk is tensor arithmetic of static shape (the
position is a tensor; nothing is read back to Python), so under torch.compile it adds no
graph break. Unbiased draws ('bernoulli_weight', or uniform ones scaled n/k) scale
each kept channel by 1/p; at lr 0.1 that variance kept the digits CNN at chance.
"""
import torch

from ..functional import channel_norms, select_columns
from ..functional._checks import DIST_POLICIES, SPARSE_GRAD_MODES, check_explore, check_seed
from ._config import SamplingConfig
from ._registry import is_registered, register_sampled, sampled_layers_of
from .schedule import SCHEDULE_KEY, schedule_of


class WeightSampled(SamplingConfig):
    _allowed_policies = DIST_POLICIES

    def _init_dist(self, seed, weight_layout="input_major", explore=0.1):
        self._init_layout(weight_layout)
        self.explore = explore
        self.seed = seed  # (also sets the generator and rotation: none drawn yet)
        self.last_indices = None
        self._touched = None
        self._index_sync = None  # set by the distributed agreement mode 'broadcast'
        self._prepared = None  # (key, indices, scale, weight operand) from prepare_next
        register_sampled(self)

    def __setstate__(self, state):
        # A prepared selection is not carried over to a copy (and layers pickled before
        # it existed lack the attribute).
        super().__setstate__(state)
        self._prepared = None
        rotation = self.__dict__.setdefault("_rotation", None)
        if rotation is not None and not isinstance(rotation[1], torch.Tensor):  # an earlier version's
            self._rotation = (rotation[0], torch.tensor(int(rotation[1]), dtype=torch.long))
        self.__dict__.setdefault("_explore", 0.1)
        if "seed" in self.__dict__:  # pickled before seed was a property
            self.__dict__["_seed"] = self.__dict__.pop("seed")
        # A copy (deepcopy, unpickling) holds a new weight: register it now rather than at
        # its first training forward, where under torch.compile the registration is a
        # graph break (and a recompile) per layer.
        if getattr(self, "weight", None) is not None:
            register_sampled(self)

    @property
    def seed(self):
        return self._seed

    @seed.setter
    def seed(self, value):
        """Validated; assigning one restarts the selection stream from it (the generator
        is drawn from the seed, so keeping the old one would ignore the assignment)."""
        self._seed = check_seed(value)
        self._rotation = None  # (permutation of the channels, position tensor) of 'topk_explore'
        self._generator = None
        self._generator_state = None  # restored state waiting for the first draw
        if getattr(self, "weight", None) is not None:
            # drawn now, outside any compiled forward (a draw there is a graph break)
            self._rotation = self._new_rotation(self.weight.shape[1])

    def _new_rotation(self, n):
        """The rotation of a layer with n input channels: a permutation drawn from the seed
        alone on the CPU (the same on every rank and device) and its start."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g), torch.zeros((), dtype=torch.long)

    @property
    def explore(self):
        return self._explore

    @explore.setter
    def explore(self, value):
        self._explore = check_explore(value)

    # -- selection -------------------------------------------------------------------
    @property
    def generator(self):
        if self._generator is None or self._generator.device != self.weight.device:
            g = torch.Generator(device=self.weight.device)
            g.manual_seed(self.seed)
            if self._generator_state is not None:
                g.set_state(self._generator_state)
                self._generator_state = None
            self._generator = g
        return self._generator

    def _records_grad(self, input):
        """Whether a training forward on `input` records an autograd graph. One that does
        not (under no_grad, or nothing requiring grad: a logging pass) cannot produce a
        gradient, so it must not move the selection stream either: a rank running an
        extra one would otherwise select other channels than the others from then on."""
        if not torch.is_grad_enabled():
            return False
        bias = getattr(self, "bias", None)
        return bool(input.requires_grad or self.weight.requires_grad
                    or (bias is not None and bias.requires_grad))

    def _select(self, records=True):
        """(indices or None for all, scale or None) for a training forward. records=False
        (a forward that records no gradient): the generator and the rotation are read
        but left where they were, and the 'broadcast' agreement's collective is skipped
        (the selection reaches no gradient; the other ranks run no such forward)."""
        if not records:
            saved = (self._rotation, self._generator_state,
                     None if self._generator is None else (self._generator, self._generator.get_state()))
            try:
                return self._draw()
            finally:
                self._rotation, self._generator_state = saved[0], saved[1]
                if saved[2] is None:
                    self._generator = None
                else:
                    self._generator = saved[2][0]
                    self._generator.set_state(saved[2][1])
        idx, scale = self._draw()
        if self._index_sync is not None:
            idx, scale = self._index_sync(self, idx, scale)
        return idx, scale

    def _draw(self):
        n = self.weight.shape[1]
        k = self.num_samples_of(n)
        idx, scale = None, None
        if k < n:
            scores = channel_norms(self.weight.detach(), 1)
            if self.policy == "topk_explore":
                idx = self._explore_select(scores, k)
            else:
                gen = self.generator if self.policy == "bernoulli_weight" else None
                idx, scale = select_columns(scores, k, self.policy, gen)
        return idx, scale

    def _explore_select(self, scores, k):
        """Top k - r by norm plus the next r channels of the rotation not among them (which
        a forward recording no gradient reads without moving: _select); sorted. Static
        shapes and no value read back to Python, so torch.compile traces it whole."""
        n = scores.numel()
        r = min(k, max(1, round(self.explore * k))) if self.explore > 0 else 0
        chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
        if k - r > 0:
            chosen[torch.topk(scores.float(), k - r, sorted=False).indices] = True
        if r > 0:
            rotation = self._rotation
            if rotation is None or rotation[0].numel() != n:
                rotation = self._new_rotation(n)
            perm, pos = rotation
            if perm.device != scores.device:
                perm, pos = perm.to(scores.device), pos.to(scores.device)
            order = perm[(pos + torch.arange(n, device=scores.device)) % n]  # the walk from pos
            free = ~chosen[order]
            count = torch.cumsum(free, 0)  # n - (k - r) >= r channels are free
            taken = free & (count <= r)  # the first r free ones
            chosen = chosen.scatter(0, order, chosen[order] | taken)
            end = torch.searchsorted(count, count.new_full((1,), r))[0] + 1
            self._rotation = (perm, (pos + end) % n)  # through the r-th taken one
        # the k chosen channels in ascending order (a stable sort puts them first)
        return torch.sort((~chosen).to(torch.uint8), stable=True).indices[:k]

    def prepare_next(self):
        """Select the channels of the next training forward now and, in mode 'forward',
        gather their weights.

        For a caller that knows the weight has just changed and has idle time before the
        forward: the comm hook's optimizer_wrapper calls it after stepping the layer's
        weight while later buckets are still on the wire (a 'topk_explore' selection moves
        the rotation here, as the forward would have). The next training forward uses
        the result if the weight is the same tensor, not modified in place since (its
        version counter) and the sampling settings are unchanged; otherwise it selects
        anew. Only for the top-k policies ('topk_explore', 'topk_weight') in modes
        'forward' and 'weight_grad' (which has no weight to gather, but the selection's
        norms and top-k leave the forward) without the 'broadcast' agreement (whose
        selection is a collective): elsewhere a no-op.
        Writes through ``weight.data`` bypass the version counter: call
        ``discard_prepared()`` after those."""
        self._prepared = None
        if not self.training or self.policy not in ("topk_weight", "topk_explore") \
                or self.mode not in ("forward", "weight_grad") or self._index_sync is not None:
            return
        idx, scale = self._select()  # for a training forward: the rotation moves
        w_s = None if idx is None or self.mode != "forward" else \
            self._sampled_weight(self.weight.detach(), idx, scale)
        self._prepared = (self._prepared_key(), idx, scale, w_s)

    def discard_prepared(self):
        self._prepared = None

    def _prepared_key(self):
        w = self.weight
        return (w._version, w.data_ptr(), w.dtype, w.device, self.sample_ratio, self.minimal_k,
                self.policy, self.mode, self.sampling_enabled)

    def _selection(self, records=True):
        """(indices, scale, prepared weight operand or None) for a training forward;
        records: whether it records a gradient (_records_grad)."""
        if not records:  # a pass without autograd leaves the prepared one
            idx, scale = self._select(records=False)
            return idx, scale, None
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == self._prepared_key():
            return prepared[1:]
        idx, scale = self._select()
        return idx, scale, None

    def _record(self, idx, records=True):
        # The comm hooks find this layer through its weight. A deep copy, an unpickled
        # layer or a replaced weight is not in the registry yet; every training forward
        # makes sure it is, or the hook would miss this layer's channels.
        if not is_registered(self):
            register_sampled(self)
        n = self.weight.shape[1]
        used = idx if idx is not None else torch.arange(n, device=self.weight.device)
        self.last_indices = used
        if records and self.weight.requires_grad:
            if self._touched is None:
                self._touched = torch.zeros(n, dtype=torch.bool, device=self.weight.device)
            self._touched[used] = True

    def _note_dense_use(self):
        """An exact forward (eval mode) with autograd on: every column gets a gradient."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            n = self.weight.shape[1]
            self._touched = torch.ones(n, dtype=torch.bool, device=self.weight.device)

    # -- for the comm hook ---------------------------------------------------------
    def pop_touched(self):
        """Channels whose weight gradient may be non-zero since the last call, and reset.

        Returns None when every channel may be non-zero (reduce densely), else a sorted
        LongTensor (possibly empty)."""
        touched, self._touched = self._touched, None
        if self.mode not in SPARSE_GRAD_MODES:  # blackbox gradients are dense
            return None
        if touched is None:
            return torch.empty(0, dtype=torch.long, device=self.weight.device)
        idx = touched.nonzero().squeeze(1)
        return None if idx.numel() == touched.numel() else idx

    # -- checkpoints ------------------------------------------------------------------
    def sampler_state(self):
        state = self._generator.get_state() if self._generator is not None else self._generator_state
        rotation = getattr(self, "_rotation", None)
        return {"seed": self.seed, "generator": state,
                "rotation": None if rotation is None else (rotation[0].cpu(), int(rotation[1]))}

    def load_sampler_state(self, state):
        self.seed = int(state["seed"])  # (draws the rotation from the seed, drops the generator)
        self._generator_state = state.get("generator")
        rotation = state.get("rotation")
        if rotation is not None:  # (a permutation drawn by an earlier version is walked as it is)
            self._rotation = (rotation[0].to(self.weight.device),
                              torch.tensor(int(rotation[1]), dtype=torch.long, device=self.weight.device))


def pop_touched_of(param):
    """The channels of `param` whose gradient may be non-zero since the last call, over
    every weight-sampled layer holding it (a tied weight's gradient is the sum of each
    use's), and reset them: None for all channels (reduce densely, also when no layer
    holds `param`), else a sorted LongTensor (possibly empty)."""
    layers = sampled_layers_of(param)
    if not layers:
        return None
    touched = [layer.pop_touched() for layer in layers]  # every layer resets
    if any(idx is None for idx in touched):
        return None
    if len(touched) == 1:
        return touched[0]
    union = torch.unique(torch.cat(touched))  # sorted
    return None if union.numel() == param.shape[1] else union


def touched_count_of(param):
    """How many channels pop_touched_of(param) would return, without resetting them:
    param.shape[1] for all channels (also when no layer holds `param`), else the size of
    the union of every holding layer's touched channels."""
    n = param.shape[1]
    layers = sampled_layers_of(param)
    if not layers or any(layer.mode not in SPARSE_GRAD_MODES for layer in layers):
        return n
    masks = [layer._touched for layer in layers if layer._touched is not None]
    if not masks:
        return 0
    union = masks[0] if len(masks) == 1 else torch.stack(masks).any(0)
    return int(union.sum())


def sampler_state(model):
    """Generator states of every weight-sampled layer, keyed by module name, and the
    count of an attached SamplingSchedule (key "#schedule"): save it with a checkpoint
    so a resumed run draws the same channels, and runs the same steps exactly, as an
    uninterrupted one."""
    state = {name: m.sampler_state() for name, m in model.named_modules() if isinstance(m, WeightSampled)}
    schedule = schedule_of(model)
    if schedule is not None:
        state[SCHEDULE_KEY] = schedule.state_dict()
    return state


def load_sampler_state(model, state):
    layers = {name: m for name, m in model.named_modules() if isinstance(m, WeightSampled)}
    schedule = schedule_of(model)
    if schedule is not None and SCHEDULE_KEY not in state:
        raise ValueError("sampler state does not match the model: the model has a SamplingSchedule, "
                         "the state no schedule count")
    missing = sorted(set(layers) - set(state))
    unexpected = sorted(set(state) - set(layers) - ({SCHEDULE_KEY} if schedule is not None else set()))
    if missing or unexpected:
        raise ValueError(f"sampler state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, layer in layers.items():
        layer.load_sampler_state(state[name])
    if schedule is not None:
        schedule.load_state_dict(state[SCHEDULE_KEY])
