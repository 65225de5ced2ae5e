"""A run's ``privacy`` block, checked once when the run is made and again where it is used.

    {"mode": "central" | "local",
     "noise_multiplier": z,            # noise std = z x clip norm (per device update)
     "clip_norm": C,                   # fixed clip norm, or the initial one when adaptive
     "adaptive": null | {"target_quantile": 0.5, "learning_rate": 0.2,
                         "count_noise_std": null},   # Andrew et al. 2021
     "delta": 1e-5,
     "epsilon_budget": null | ε,       # the run stops before a round would exceed it
     "seed": null | int}               # reproducible noise (tests, benchmarks): see mechanism

Local mode: the devices clip and noise; the same ``clip_norm`` and ``noise_multiplier``
reach them in the run's train config (``LocalPrivacy``, ``train_config["privacy"]``).
Adaptive clipping is central only (the clipped count must be noised by a trusted party).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

CENTRAL = "central"
LOCAL = "local"
ADAPTIVE_DEFAULTS: dict[str, Any] = {
    "target_quantile": 0.5,
    "learning_rate": 0.2,
    "count_noise_std": None,
}
_KEYS = {"mode", "noise_multiplier", "clip_norm", "adaptive", "delta", "epsilon_budget", "seed"}


class PrivacyError(ValueError):
    """A privacy setting is missing or out of range; the message says which."""


def _positive(d: Mapping[str, Any], key: str, *, zero: bool = False) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise PrivacyError(f"privacy.{key} must be a number, got {v!r}")
    if v < 0 or (v == 0 and not zero):
        raise PrivacyError(f"privacy.{key} must be {'>= 0' if zero else '> 0'}, got {v!r}")
    return float(v)


def _seed(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PrivacyError(f"privacy.seed must be a non-negative integer or null, got {v!r}")
    return int(v)


def _adaptive(adaptive: Any, mode: str, z: float) -> tuple[float | None, float, float | None]:
    """(target quantile, learning rate, count noise std) of ``privacy.adaptive``."""
    if adaptive in (None, False):
        return None, 0.2, None
    if mode == LOCAL:
        raise PrivacyError("privacy.adaptive works in central mode only")
    a = {**ADAPTIVE_DEFAULTS, **(adaptive if isinstance(adaptive, Mapping) else {})}
    unknown = set(a) - set(ADAPTIVE_DEFAULTS)
    if unknown:
        raise PrivacyError(f"unknown privacy.adaptive keys {sorted(unknown)}")
    quantile = _positive(a, "target_quantile")
    if not quantile < 1:
        raise PrivacyError(f"privacy.adaptive.target_quantile must be below 1, got {quantile}")
    lr = _positive(a, "learning_rate")
    count_std = None
    if a["count_noise_std"] is not None:
        count_std = _positive(a, "count_noise_std")
        if z > 0 and not 2 * count_std > z:
            raise PrivacyError(
                "privacy.adaptive.count_noise_std must exceed noise_multiplier / 2 "
                f"(Andrew et al. 2021, Theorem 1); got {count_std} for z={z}"
            )
    return quantile, lr, count_std


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str
    noise_multiplier: float
    clip_norm: float
    target_quantile: float | None = None  # None: fixed clip norm
    clip_learning_rate: float = 0.2
    count_noise_std: float | None = None  # None: max(m/20, z) at each round (see mechanism)
    delta: float = 1e-5
    epsilon_budget: float | None = None
    seed: int | None = None

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    @classmethod
    def from_dict(cls, d: Any) -> PrivacyConfig:
        if not isinstance(d, Mapping):
            raise PrivacyError(f"privacy must be an object, got {type(d).__name__}")
        unknown = set(d) - _KEYS
        if unknown:
            raise PrivacyError(f"unknown privacy keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        mode = d.get("mode", CENTRAL)
        if mode not in (CENTRAL, LOCAL):
            raise PrivacyError(f"privacy.mode must be {CENTRAL!r} or {LOCAL!r}, got {mode!r}")
        z = _positive(d, "noise_multiplier", zero=True)
        clip = _positive(d, "clip_norm")
        delta = _positive({"delta": d.get("delta", 1e-5)}, "delta")
        if not delta < 1:
            raise PrivacyError(f"privacy.delta must be below 1, got {delta}")
        budget = d.get("epsilon_budget")
        if budget is not None:
            budget = _positive(d, "epsilon_budget")
            if z == 0:
                raise PrivacyError("privacy.epsilon_budget needs noise_multiplier > 0 (ε is ∞)")
        quantile, lr, count_std = _adaptive(d.get("adaptive"), mode, z)
        return cls(mode, z, clip, quantile, lr, count_std, delta, budget, _seed(d.get("seed")))

    def to_dict(self) -> dict[str, Any]:
        """The canonical block (what the run config records)."""
        adaptive = None
        if self.adaptive:
            adaptive = {
                "target_quantile": self.target_quantile,
                "learning_rate": self.clip_learning_rate,
                "count_noise_std": self.count_noise_std,
            }
        return {
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "adaptive": adaptive,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "seed": self.seed,
        }

    def local(self) -> LocalPrivacy:
        return LocalPrivacy(self.clip_norm, self.noise_multiplier, self.seed)


# The train config keys that carry local DP to the devices (a round announcement's
# train_config holds scalars only, so the block travels flat).
TRAIN_KEYS = ("dp_clip_norm", "dp_noise_multiplier", "dp_seed")


@dataclass(frozen=True)
class LocalPrivacy:
    """What a device needs for local DP, carried in the train config as ``TRAIN_KEYS``."""

    clip_norm: float
    noise_multiplier: float
    seed: int | None = None

    @classmethod
    def from_train(cls, train: Mapping[str, Any]) -> LocalPrivacy | None:
        """From a train config: None when it has no DP keys; PrivacyError when malformed."""
        if not any(k in train for k in TRAIN_KEYS):
            return None
        d = {k[3:]: train.get(k) for k in TRAIN_KEYS}
        return cls(
            _positive(d, "clip_norm"),
            _positive(d, "noise_multiplier", zero=True),
            _seed(d.get("seed")),
        )

    def to_train(self) -> dict[str, Any]:
        return {f"dp_{k}": v for k, v in asdict(self).items()}
