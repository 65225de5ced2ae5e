"""The one error of secure aggregation; its text says why, for a refusal or a failed round."""

from __future__ import annotations


class SecAggError(ValueError):
    """A SecAgg+ step that cannot go on: too few shares, a forged roster, a device asked to
    reveal both secrets of one peer, a ciphertext that does not open."""
