"""Differential privacy: configuration, the Gaussian mechanism, adaptive clipping and the
accountant (Google's ``dp-accounting`` RDP accountant).

``config.py`` parses a run's ``privacy`` block; ``mechanism.py`` clips and noises (central
DP-FedAvg on the worker, local DP on the device); ``accountant.py`` turns the rounds' noise
multipliers and sampling rates into (ε, δ).
"""

from __future__ import annotations

from learning.privacy.accountant import RoundEvent, epsilon_after, epsilon_with_next
from learning.privacy.config import (
    ADAPTIVE_DEFAULTS,
    CENTRAL,
    LOCAL,
    TRAIN_KEYS,
    LocalPrivacy,
    PrivacyConfig,
    PrivacyError,
)
from learning.privacy.mechanism import (
    adaptive_clip_update,
    add_gaussian_noise,
    noise_generator,
    privatize_update,
    split_noise_multiplier,
)

__all__ = [
    "ADAPTIVE_DEFAULTS",
    "CENTRAL",
    "LOCAL",
    "TRAIN_KEYS",
    "LocalPrivacy",
    "PrivacyConfig",
    "PrivacyError",
    "RoundEvent",
    "adaptive_clip_update",
    "add_gaussian_noise",
    "epsilon_after",
    "epsilon_with_next",
    "noise_generator",
    "privatize_update",
    "split_noise_multiplier",
]
