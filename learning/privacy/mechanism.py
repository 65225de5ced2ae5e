"""The Gaussian mechanism, clipping and adaptive clip norms, on plain numpy arrays.

Central DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"): each device's delta is clipped to L2 norm C, the clipped deltas are
averaged with **uniform** weights over the m folded updates, and Gaussian noise of std
``z·C/m`` is added once to the average (equivalently N(0, (zC)²) on the sum). Uniform
weights keep one device's influence on the sum at most C whatever its sample count; the
sensitivity of the *average* is C/m with m the number actually folded (Flower's
server-side DP does the same). A fixed-denominator estimator (divide by the expected
count qN) is the strict form; with m > 1 the difference is the usual approximation.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): C ← C·exp(-η(b̃ - q_target)) where b̃ = (Σ 1[‖Δ_k‖ ≤ C] + N(0, s_b²)) / m is the
noised fraction of unclipped updates and q_target the target quantile. The count is released
too, so the update's noise multiplier becomes ``z_Δ = (z⁻² - (2s_b)⁻²)^-½`` and the two
releases together cost what one Gaussian mechanism of multiplier z costs: the accountant
keeps counting z.

Randomness. Without a seed the generator (numpy's Philox) is keyed with 256 bits from the
operating system's CSPRNG (``secrets``), drawn afresh per round and never stored: nobody
who did not read the aggregating process's memory can predict or subtract the noise.
Philox is a counter-based generator, not a vetted CSPRNG; only its Gaussian samples added
into a sum ever leave the process, never raw output. With ``seed`` set (tests,
benchmarks, reproducible research runs) the key is SHA-256(seed, context): the same run
draws the same noise, and **anyone who knows the seed can remove it**, so a seeded run
offers no privacy against them. Floating-point sampling (Mironov 2012) is not hardened.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]


def noise_generator(seed: int | None, *context: object) -> np.random.Generator:
    """A Philox generator: keyed from SHA-256(seed, context) when seeded (reproducible),
    else from 256 bits of OS entropy (see the module docstring)."""
    if seed is None:
        key = secrets.randbits(256)
    else:
        text = ":".join(str(c) for c in (seed, *context)).encode()
        key = int.from_bytes(hashlib.sha256(text).digest(), "big")
    # Philox takes a 128-bit key; fold the 256 bits so every bit counts.
    folded = (key >> 128) ^ (key & ((1 << 128) - 1))
    return np.random.Generator(np.random.Philox(key=folded))


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for t in tensors.values():
        flat = np.asarray(t, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def add_gaussian_noise(
    tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> None:
    """Add N(0, std²) to every element, in place (in the arrays' own dtype)."""
    if std <= 0:
        return
    for t in tensors.values():
        t += rng.normal(0.0, std, size=t.shape).astype(t.dtype, copy=False)


def privatize_update(
    delta: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Weights, float]:
    """Local DP: ``delta`` clipped to ``clip_norm`` plus N(0, (z·C)²) per element (float32
    copies); returns them and the norm the delta had before clipping."""
    norm = global_norm(delta)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    out = {
        n: (np.asarray(t, dtype=np.float64) * scale).astype(np.float32) for n, t in delta.items()
    }
    add_gaussian_noise(out, noise_multiplier * clip_norm, rng)
    return out, norm


def split_noise_multiplier(z: float, count_noise_std: float) -> float:
    """The update's multiplier ``z_Δ`` when the clipped count is also released with std
    ``s_b`` (Andrew et al. 2021, Theorem 1): ``(z⁻² - (2s_b)⁻²)^-½``."""
    if z == 0:
        return 0.0
    rest = z**-2 - (2 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(f"count noise std {count_noise_std} must exceed z/2 = {z / 2}")
    return float(rest**-0.5)


def default_count_noise_std(num_updates: int, z: float) -> float:
    """s_b when not configured: m/20 as Andrew et al. suggest, but at least z so that
    ``z_Δ`` stays within 1.16·z."""
    return max(num_updates / 20.0, z)


def adaptive_clip_update(
    clip_norm: float,
    unclipped: int,
    num_updates: int,
    target_quantile: float,
    learning_rate: float,
    count_noise_std: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """The next round's clip norm and the noised unclipped fraction b̃ it came from."""
    noised = (unclipped + rng.normal(0.0, count_noise_std)) / num_updates
    return float(clip_norm * math.exp(-learning_rate * (noised - target_quantile))), float(noised)
