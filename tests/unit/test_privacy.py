"""Differential privacy: clipping and noise against the configuration, the accountant
against dp-accounting itself, adaptive clipping, the config, and local DP on a device."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from devices.config import TrainSettings
from devices.local import LocalTrainer
from fedmq.wiring import privacy_config
from learning.models import build_model
from learning.privacy import (
    TRAIN_KEYS,
    LocalPrivacy,
    PrivacyConfig,
    PrivacyError,
    RoundEvent,
    adaptive_clip_update,
    epsilon_after,
    epsilon_with_next,
    noise_generator,
    privatize_update,
    split_noise_multiplier,
)
from learning.privacy.accountant import ORDERS
from learning.strategies import FedAvg
from protocol.codec import Encoding, decode, encode
from workers.fold import GlobalModel, UpdateRef, fold_updates, make_folder
from workers.tasks.privacy import RoundPrivacy, UnitWeights, release


def _central(z: float, clip: float, **kw: object) -> PrivacyConfig:
    return PrivacyConfig.from_dict(
        {"mode": "central", "noise_multiplier": z, "clip_norm": clip, "seed": 7, **kw}
    )


def _fold_central(
    deltas: list[np.ndarray], counts: list[int], cfg: PrivacyConfig, clip: float
) -> tuple[np.ndarray, dict[str, object]]:
    """The worker's path: codec blobs -> clipped deltas -> uniform mean -> noise once."""
    base = GlobalModel.from_tensors({"w": np.zeros(deltas[0].shape, np.float32)}, "0")
    blobs = {
        f"b{i}": encode({"w": d.astype(np.float32)}, Encoding.FP32) for i, d in enumerate(deltas)
    }
    refs = [UpdateRef(f"c{i}", f"b{i}", n) for i, n in enumerate(counts)]
    strategy = FedAvg(clip_norm=clip)
    folder = UnitWeights(make_folder(strategy, len(refs)))
    result = fold_updates(refs, blobs.__getitem__, base, strategy, folder=folder)
    plan = RoundPrivacy(cfg, clip, (), selected=len(refs), registered=len(refs))
    metrics = release(plan, result.delta, len(result.folded), result.clipped, "run", 1)
    return result.delta["w"], metrics


def test_each_update_is_clipped_and_the_mean_is_uniform_whatever_the_sample_counts() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=50) * s for s in (0.01, 1.0, 10.0, 100.0)]
    clip = 0.5
    got, metrics = _fold_central(deltas, [1, 10, 100, 1000], _central(0.0, clip), clip)
    clipped = [d * min(1.0, clip / np.linalg.norm(d)) for d in deltas]
    np.testing.assert_allclose(got, np.mean(clipped, axis=0), rtol=1e-6, atol=1e-9)
    assert metrics["unclipped"] == 1 and metrics["noise_std"] == 0.0


def test_central_noise_has_the_configured_std_added_once_to_the_mean() -> None:
    z, clip, m, size = 1.3, 0.8, 5, 200_000
    deltas = [np.zeros(size) for _ in range(m)]
    got, metrics = _fold_central(deltas, [3] * m, _central(z, clip), clip)
    want = z * clip / m
    assert metrics["noise_std"] == pytest.approx(want)
    assert abs(float(got.mean())) < 5 * want / math.sqrt(size)
    assert float(got.std()) == pytest.approx(want, rel=0.02)
    again, _ = _fold_central(deltas, [3] * m, _central(z, clip), clip)
    np.testing.assert_array_equal(got, again)  # seeded: reproducible


def test_unseeded_noise_differs_between_runs() -> None:
    a = noise_generator(None, "run", 1).normal(size=4)
    b = noise_generator(None, "run", 1).normal(size=4)
    assert not np.array_equal(a, b)


def test_local_dp_clips_then_adds_noise_of_std_z_times_clip() -> None:
    big = {"a": np.full(1000, 3.0, np.float32), "b": np.full(10, -3.0, np.float32)}
    clipped, norm = privatize_update(big, 2.0, 0.0, noise_generator(1))
    assert norm == pytest.approx(3.0 * math.sqrt(1010))
    flat = np.concatenate([clipped["a"], clipped["b"]])
    assert float(np.linalg.norm(flat)) == pytest.approx(2.0, rel=1e-5)
    zeros = {"w": np.zeros(300_000, np.float32)}
    noised, _ = privatize_update(zeros, 0.5, 1.5, noise_generator(2))
    assert float(noised["w"].std()) == pytest.approx(0.75, rel=0.02)


def test_the_accountant_matches_dp_accounting_computed_directly() -> None:
    delta = 1e-5
    events = [RoundEvent(0.1, 1.1)] * 30 + [RoundEvent(0.2, 1.1)] * 10
    direct = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.1)), 10)
    assert epsilon_after(events, delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
    # q = 1 is the plain Gaussian mechanism, composed R times.
    plain = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    plain.compose(dp_accounting.GaussianDpEvent(2.0), 5)
    assert epsilon_after([RoundEvent(1.0, 2.0)] * 5, delta) == pytest.approx(
        plain.get_epsilon(delta)
    )
    # The PLD accountant agrees within the RDP bound's looseness (RDP is an upper bound).
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.1)), 10)
    assert pld.get_epsilon(delta) <= epsilon_after(events, delta) * 1.01
    assert epsilon_with_next(events, delta) > epsilon_after(events, delta)
    assert epsilon_after([RoundEvent(1.0, 0.0)], delta) == math.inf


def test_release_records_epsilon_and_marks_the_budget_spent_before_it_is_passed() -> None:
    cfg = _central(2.0, 1.0, epsilon_budget=4.5)
    history = (RoundEvent(1.0, 2.0),) * 2
    plan = RoundPrivacy(cfg, 1.0, history, selected=3, registered=3)
    out = release(plan, {"w": np.zeros(3)}, 3, 0, "run", 3)
    assert out["epsilon"] == pytest.approx(epsilon_after([RoundEvent(1.0, 2.0)] * 3, 1e-5))
    assert out["epsilon_next"] > 4.5 and "budget spent" in str(out["budget_spent"])
    over = RoundPrivacy(cfg, 1.0, (RoundEvent(1.0, 2.0),) * 5, selected=3, registered=3)
    with pytest.raises(Exception, match="not released"):
        release(over, {"w": np.zeros(3)}, 3, 0, "run", 6)


def test_adaptive_clipping_follows_andrew_et_al() -> None:
    # All updates unclipped (fraction 1 > target 0.5): the clip norm shrinks, by the formula.
    rng = noise_generator(3)
    nxt, frac = adaptive_clip_update(1.0, 10, 10, 0.5, 0.2, 0.5, rng)
    assert nxt == pytest.approx(math.exp(-0.2 * (frac - 0.5)))
    assert nxt < 1.0
    # Noise split: the two releases cost one Gaussian of multiplier z.
    z, s_b = 1.0, 2.0
    z_delta = split_noise_multiplier(z, s_b)
    assert z_delta**-2 + (2 * s_b) ** -2 == pytest.approx(z**-2)
    cfg = _central(1.0, 1.0, adaptive={"target_quantile": 0.5, "count_noise_std": 2.0})
    plan = RoundPrivacy(cfg, 1.0, (), selected=4, registered=8)
    out = release(plan, {"w": np.zeros(10)}, 4, 0, "run", 1)
    assert out["update_noise_multiplier"] == pytest.approx(z_delta)
    assert out["noise_std"] == pytest.approx(z_delta * 1.0 / 4)
    assert out["q"] == 0.5 and out["next_clip_norm"] != 1.0


@pytest.mark.parametrize(
    "block",
    [
        {"noise_multiplier": -1, "clip_norm": 1},
        {"noise_multiplier": 1, "clip_norm": 0},
        {"noise_multiplier": 1, "clip_norm": 1, "mode": "both"},
        {"noise_multiplier": 1, "clip_norm": 1, "delta": 1.5},
        {"noise_multiplier": 0, "clip_norm": 1, "epsilon_budget": 3},
        {"noise_multiplier": 1, "clip_norm": 1, "mode": "local", "adaptive": {}},
        {"noise_multiplier": 2, "clip_norm": 1, "adaptive": {"count_noise_std": 0.5}},
        {"noise_multiplier": 1, "clip_norm": 1, "unknown": 1},
    ],
)
def test_bad_privacy_blocks_are_refused_with_a_reason(block: dict[str, object]) -> None:
    with pytest.raises(PrivacyError, match="privacy"):
        PrivacyConfig.from_dict(block)


def test_central_dp_needs_a_weighted_mean_strategy() -> None:
    block = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    with pytest.raises(ValueError, match="weighted-mean"):
        privacy_config(block, {"name": "fedmedian"}, {})
    dp, train = privacy_config(block, {"name": "fedadam"}, {"lr": 0.1})
    assert dp is not None and dp["mode"] == "central" and train == {"lr": 0.1}
    with pytest.raises(ValueError, match="privacy block"):
        privacy_config(None, {"name": "fedavg"}, {"dp_clip_norm": 1.0})


def test_local_dp_reaches_the_device_through_the_train_config_and_bounds_its_update() -> None:
    block = {"mode": "local", "noise_multiplier": 0.0, "clip_norm": 0.01, "seed": 5}
    dp, train = privacy_config(block, {"name": "fedavg"}, {"lr": 0.1})
    assert dp is not None
    assert {k: train[k] for k in TRAIN_KEYS} == {
        "dp_clip_norm": 0.01,
        "dp_noise_multiplier": 0.0,
        "dp_seed": 5,
    }
    settings = TrainSettings().with_overrides(train)
    assert settings.privacy == LocalPrivacy(0.01, 0.0, 5)
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    y = np.arange(40) % 10
    model = build_model("mlp", num_classes=10, input_shape=(64,), seed=0)
    trainer = LocalTrainer(model, x, y, client_index=0, encoding="fp32")
    from learning.params import to_numpy

    update = trainer.step(to_numpy(model), 0, 1, settings)
    sent = decode(update.blob).tensors
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))
    assert norm <= 0.01 * (1 + 1e-5)
    assert update.metrics["dp_norm"] > 0.01 and update.metrics["dp_clipped"] == 1.0
    with pytest.raises(PrivacyError):
        TrainSettings().with_overrides({"dp_clip_norm": -1, "dp_noise_multiplier": 1})
