"""Error feedback for lossy update encodings (int8, top-k).

Seide et al. 2014 (1-bit SGD), Karimireddy et al., "Error Feedback Fixes SignSGD" (ICML
2019): what the encoding dropped is remembered and added to the next update, so the sum of
what was sent tracks the sum of the true updates up to one bounded residual.

    ef = ErrorFeedback()
    to_send = ef.compensate(delta)        # delta + e
    decoded = decode(encode(to_send))     # the lossy round trip
    ef.update(decoded)                    # e = (delta + e) - decoded

Works on dicts of numpy arrays; only float tensors carry a residual, others pass through.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from learning.params import Arrays, is_float


class ErrorFeedback:
    def __init__(self) -> None:
        self.residual: Arrays = {}
        self._pending: Arrays | None = None

    def compensate(self, delta: Mapping[str, np.ndarray]) -> Arrays:
        """``delta + e`` (float tensors); remembered until ``update``."""
        out: Arrays = {}
        for name, d in delta.items():
            d = np.asarray(d)
            if is_float(d):
                e = self.residual.get(name)
                out[name] = d.astype(np.float32) + (e if e is not None else 0.0)
            else:
                out[name] = d
        self._pending = out
        return out

    def update(self, sent_decoded: Mapping[str, np.ndarray]) -> None:
        """After the lossy round trip of the compensated delta: ``e = compensated - decoded``."""
        if self._pending is None:
            raise RuntimeError("update() without compensate()")
        self.residual = {
            name: (c - np.asarray(sent_decoded[name], np.float32)).astype(np.float32)
            for name, c in self._pending.items()
            if is_float(c)
        }
        self._pending = None

    def reset(self) -> None:
        self.residual, self._pending = {}, None

    def residual_norm(self) -> float:
        squares = sum(float(np.square(e, dtype=np.float64).sum()) for e in self.residual.values())
        return float(np.sqrt(squares))
