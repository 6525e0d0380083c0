"""The sampling configuration every approximate module carries.

The attributes are validated on every assignment, so a schedule that changes
sample_ratio between steps gets the same clear errors as the constructor."""
import torch

from ..functional import num_samples
from ..functional._checks import (
    POLICIES,
    check_minimal_k,
    check_mode,
    check_policy,
    check_sample_ratio,
    check_weight_layout,
)
from ..functional._layout import to_dim1_major


class SamplingConfig:
    """Mixin: `sample_ratio`, `minimal_k`, `policy`, `mode` as validated attributes."""

    _allowed_policies = POLICIES

    def _init_sampling(self, sample_ratio, minimal_k, policy, mode):
        self._policy = check_policy(policy, self._allowed_policies)
        self._mode = check_mode(mode, policy)
        self.sample_ratio = sample_ratio
        self.minimal_k = minimal_k
        self.sampling_enabled = True

    @property
    def sampling_enabled(self):
        """False: training forwards are exact (every channel, k == n) while sample_ratio
        keeps its value; a schedule (nn/schedule.py) switches it between steps."""
        return self.__dict__.get("_sampling_enabled", True)  # (layers pickled before it existed)

    @sampling_enabled.setter
    def sampling_enabled(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"sampling_enabled must be True or False, got {value!r}")
        self._sampling_enabled = value

    def num_samples_of(self, n):
        """k, the channels a training forward keeps of n: n while sampling is disabled."""
        return num_samples(n, self.sample_ratio, self.minimal_k) if self.sampling_enabled else n

    def samples_weight(self):
        """Whether a training forward keeps fewer than all of the weight's input channels
        (False at k == n and while a schedule has sampling off)."""
        n = self.weight.shape[1]
        return self.num_samples_of(n) < n

    @property
    def sample_ratio(self):
        return self._sample_ratio

    @sample_ratio.setter
    def sample_ratio(self, value):
        self._sample_ratio = check_sample_ratio(value)

    @property
    def minimal_k(self):
        return self._minimal_k

    @minimal_k.setter
    def minimal_k(self, value):
        self._minimal_k = check_minimal_k(value)

    @property
    def policy(self):
        return self._policy

    @policy.setter
    def policy(self, value):
        check_policy(value, self._allowed_policies)
        check_mode(self._mode, value)
        self._policy = value

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = check_mode(value, self._policy)

    def _init_layout(self, weight_layout):
        self.weight_layout = weight_layout

    @property
    def weight_layout(self):
        # (layers pickled before this was a property hold it in their __dict__)
        return self.__dict__.get("_weight_layout", self.__dict__.get("weight_layout", "input_major"))

    @weight_layout.setter
    def weight_layout(self, value):
        """Validated, and applied to the weight at once (an assignment after construction
        relays the weight out, as the constructor would have)."""
        self.__dict__["_weight_layout"] = check_weight_layout(value)
        self._apply_weight_layout()

    def _apply_weight_layout(self):
        """weight_layout 'input_major' (the default) stores the weight dim-1-major
        (functional/_layout.py): same values, shape and Parameter object, only the strides
        differ. Each input channel is then one block of memory: the sampled forward
        gathers whole blocks, the weight gradient of a 1x1 conv or linear layer is
        computed transposed and written as blocks, and under DDP the gradient bucket has
        the same layout, so the sparse hook packs and scatters blocks. 'contiguous' keeps
        torch's row-major layout (Horovod's collectives and `.view()` on weights need it).
        The exact paths (eval, k == n) take a row-major copy, so they stay bit-identical
        to torch.nn."""
        w = getattr(self, "weight", None)
        if w is None or w.dim() < 2 or w.is_meta:
            return
        relaid = to_dim1_major(w.data) if self.weight_layout == "input_major" else w.data.contiguous()
        if relaid is not w.data:
            with torch.no_grad():
                w.data = relaid

    def _sampling_repr(self):
        return (f"sample_ratio={self.sample_ratio}, minimal_k={self.minimal_k}, "
                f"policy={self.policy!r}, mode={self.mode!r}")
