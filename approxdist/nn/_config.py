"""The sampling configuration every approximate module carries.

The attributes are validated on every assignment, so a schedule that changes
sample_ratio between steps gets the same clear errors as the constructor."""
from ..functional._checks import (POLICIES, check_minimal_k, check_mode, check_policy,
                                  check_sample_ratio)


class SamplingConfig:
    """Mixin: `sample_ratio`, `minimal_k`, `policy`, `mode` as validated attributes."""

    _allowed_policies = POLICIES

    def _init_sampling(self, sample_ratio, minimal_k, policy, mode):
        self._policy = check_policy(policy, self._allowed_policies)
        self._mode = check_mode(mode, policy)
        self.sample_ratio = sample_ratio
        self.minimal_k = minimal_k

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

    def _sampling_repr(self):
        return (f"sample_ratio={self.sample_ratio}, minimal_k={self.minimal_k}, "
                f"policy={self.policy!r}, mode={self.mode!r}")
