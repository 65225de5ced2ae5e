"""Every strategy matches a plain reference computation on random updates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from learning.strategies import (
    STRATEGIES,
    MemoryCapExceeded,
    PartialSum,
    Strategy,
    StrategyError,
    WeightedMean,
    clip_by_norm,
    global_norm,
    make_strategy,
    strategy_from_config,
    weighted_average,
)

Weights = dict[str, np.ndarray]
SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36)}
COUNTS = [5, 120, 33, 7, 900]  # unequal sample counts


def _model(rng: np.random.Generator, scale: float = 1.0) -> Weights:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _round(seed: int, k: int = len(COUNTS)) -> list[Weights]:
    rng = np.random.default_rng(seed)
    return [_model(rng, 0.1) for _ in range(k)]


def _run(
    strategy: Strategy, w: Weights, rounds: list[list[Weights]], counts: list[int] = COUNTS
) -> tuple[Weights, dict[str, np.ndarray]]:
    state: dict[str, np.ndarray] = {}
    for deltas in rounds:
        acc = strategy.accumulator(len(deltas))
        for d, n in zip(deltas, counts, strict=True):
            prepared, _ = strategy.prepare({k: v.copy() for k, v in d.items()})
            acc.add(prepared, n)
        w, state = strategy.step(w, acc.result(), state)
    return w, state


def _avg(deltas: list[Weights], counts: list[int]) -> Weights:
    """The papers' formula in float64, written out."""
    n = float(sum(counts))
    return {
        k: sum(c / n * d[k].astype(np.float64) for d, c in zip(deltas, counts, strict=True))
        for k in SHAPES
    }


def _assert_close(got: Weights, want: Weights, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


# --- FedAvg / FedProx: exact ----------------------------------------------------------------


def test_streaming_fedavg_equals_the_formula_in_float64() -> None:
    deltas = _round(1)
    acc = WeightedMean()
    for d, n in zip(deltas, COUNTS, strict=True):
        acc.add(d, n)
    got = acc.result()
    want = _avg(deltas, COUNTS)
    for k in SHAPES:
        assert got[k].dtype == np.float64
        np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-16)
    _assert_close(weighted_average(deltas, COUNTS), want, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_new_model_is_the_weighted_average_of_client_models_to_fp32_rounding(
    name: str,
) -> None:
    rng = np.random.default_rng(2)
    w0 = _model(rng)
    deltas = _round(3)
    new, state = _run(make_strategy(name), w0, [deltas])
    client_models = [{k: w0[k].astype(np.float64) + d[k] for k in SHAPES} for d in deltas]
    want = _avg(client_models, COUNTS)  # w = Σ n_k/n · w_k
    assert state == {}
    for k in SHAPES:
        assert new[k].dtype == np.float32
        ulp = np.spacing(np.abs(want[k]).astype(np.float32))
        assert np.all(np.abs(new[k] - want[k]) <= ulp), k


def test_fedavg_does_not_depend_on_the_order_of_updates_at_fp32() -> None:
    w0 = _model(np.random.default_rng(4))
    deltas = _round(5)
    forward, _ = _run(make_strategy("fedavg"), w0, [deltas])
    backward, _ = _run(make_strategy("fedavg"), w0, [deltas[::-1]], COUNTS[::-1])
    for k in SHAPES:
        np.testing.assert_array_equal(forward[k], backward[k])


def test_unequal_sample_counts_move_fedavg_toward_the_big_client() -> None:
    w0 = {"x": np.zeros(3, np.float32)}
    deltas = [{"x": np.full(3, 1.0, np.float32)}, {"x": np.full(3, -1.0, np.float32)}]
    new, _ = _run(make_strategy("fedavg"), w0, [deltas], [1, 3])
    np.testing.assert_allclose(new["x"], -0.5)


def test_fedprox_records_its_mu_for_the_clients() -> None:
    s = make_strategy("fedprox", proximal_mu=0.3)
    assert s.config() == {"name": "fedprox", "proximal_mu": 0.3, "clip_norm": None}
    assert s.client_config() == {"proximal_mu": 0.3}


# --- server optimisers: two rounds against plain references ----------------------------------


def _ref_fedavgm(lr: float, beta: float, nesterov: bool) -> Callable[..., Weights]:
    def run(w: Weights, rounds: list[list[Weights]], counts: list[int]) -> Weights:
        w = {k: v.astype(np.float64) for k, v in w.items()}
        v: dict[str, np.ndarray] = {k: np.zeros_like(w[k]) for k in w}
        for deltas in rounds:
            g = {k: -x for k, x in _avg(deltas, counts).items()}
            for k in w:
                v[k] = beta * v[k] + g[k]
                step = g[k] + beta * v[k] if nesterov else v[k]
                w[k] = w[k] - lr * step
        return w

    return run


def _ref_fedopt(kind: str, eta: float, b1: float, b2: float, tau: float) -> Callable[..., Weights]:
    def run(w: Weights, rounds: list[list[Weights]], counts: list[int]) -> Weights:
        w = {k: v.astype(np.float64) for k, v in w.items()}
        m = {k: np.zeros_like(w[k]) for k in w}
        v = {k: np.full_like(w[k], tau**2) for k in w}
        for deltas in rounds:
            avg = _avg(deltas, counts)
            for k in w:
                g = -avg[k]
                m[k] = b1 * m[k] + (1 - b1) * g
                if kind == "adam":
                    v[k] = b2 * v[k] + (1 - b2) * g * g
                elif kind == "yogi":
                    v[k] = v[k] - (1 - b2) * g * g * np.sign(v[k] - g * g)
                else:
                    v[k] = v[k] + g * g
                w[k] = w[k] - eta * m[k] / (np.sqrt(v[k]) + tau)
        return w

    return run


REFERENCES: dict[str, tuple[dict[str, object], Callable[..., Weights]]] = {
    "fedavgm": ({}, _ref_fedavgm(1.0, 0.9, False)),
    "fedavgm-nesterov": (
        {"server_learning_rate": 0.5, "server_momentum": 0.7, "nesterov": True},
        _ref_fedavgm(0.5, 0.7, True),
    ),
    "fedadam": ({}, _ref_fedopt("adam", 0.1, 0.9, 0.99, 1e-9)),
    "fedyogi": ({}, _ref_fedopt("yogi", 0.01, 0.9, 0.99, 1e-3)),
    "fedadagrad": ({}, _ref_fedopt("adagrad", 0.1, 0.0, 0.99, 1e-9)),
    "fedadam-custom": (
        {"eta": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-3},
        _ref_fedopt("adam", 0.03, 0.5, 0.9, 1e-3),
    ),
}


@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_server_optimiser_matches_reference_over_three_rounds(key: str) -> None:
    params, reference = REFERENCES[key]
    strategy = make_strategy(key.split("-")[0], **params)  # type: ignore[arg-type]
    w0 = _model(np.random.default_rng(6))
    rounds = [_round(10 + r) for r in range(3)]
    got, state = _run(strategy, w0, rounds)
    _assert_close(got, reference(w0, rounds, COUNTS))
    assert set(state) == {f"{slot}/{k}" for slot in strategy.state_slots for k in SHAPES}
    assert all(a.dtype == np.float32 for a in state.values())


def test_server_state_carried_between_calls_is_what_makes_momentum() -> None:
    strategy = make_strategy("fedavgm", server_momentum=0.9)
    w0 = {"x": np.zeros(2, np.float32)}
    d = [{"x": np.ones(2, np.float32)}]
    acc = strategy.accumulator(1)
    acc.add(d[0], 1)
    delta = acc.result()
    w1, state = strategy.step(w0, delta, {})
    w2, _ = strategy.step(w1, delta, state)
    w2_fresh, _ = strategy.step(w1, delta, {})
    np.testing.assert_allclose(w2["x"] - w1["x"], 1.9, rtol=1e-6)  # v = 0.9·1 + 1
    np.testing.assert_allclose(w2_fresh["x"] - w1["x"], 1.0, rtol=1e-6)


# --- robust ------------------------------------------------------------------------------------


def test_fedmedian_is_the_coordinatewise_median_whatever_the_sample_counts() -> None:
    w0 = _model(np.random.default_rng(7))
    deltas = _round(8)
    got, _ = _run(make_strategy("fedmedian"), w0, [deltas])
    want = {k: w0[k] + np.median(np.stack([d[k] for d in deltas]), axis=0) for k in SHAPES}
    _assert_close(got, want)
    same, _ = _run(make_strategy("fedmedian"), w0, [deltas], [1, 1, 1, 1, 1])
    _assert_close(same, got, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.4])
def test_fedtrimmedavg_drops_the_extremes_of_every_coordinate(beta: float) -> None:
    w0 = _model(np.random.default_rng(9))
    deltas = _round(10, k=7)
    counts = [3, 1, 4, 1, 5, 9, 2]
    got, _ = _run(make_strategy("fedtrimmedavg", beta=beta), w0, [deltas], counts)
    cut = int(beta * 7)
    want = {}
    for k in SHAPES:
        s = np.sort(np.stack([d[k].astype(np.float64) for d in deltas]), axis=0)
        want[k] = w0[k] + s[cut : 7 - cut].mean(axis=0)
    _assert_close(got, want)


def test_robust_strategies_shrug_off_one_huge_update() -> None:
    w0 = {"x": np.zeros(4, np.float32)}
    deltas = [{"x": np.full(4, v, np.float32)} for v in (0.1, 0.2, 0.3, 0.2, 1e6)]
    for name in ("fedmedian", "fedtrimmedavg"):
        got, _ = _run(make_strategy(name), w0, [deltas])
        assert np.all(np.abs(got["x"]) < 0.3), name


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_refuse_beyond_the_memory_cap_with_a_clear_error(name: str) -> None:
    s = make_strategy(name)
    assert not s.streaming
    model = 100 * 2**20
    s.check_memory(10, model, cap_bytes=2 * 2**30)
    with pytest.raises(MemoryCapExceeded, match=rf"{name} needs .* 100 updates .*cap"):
        s.check_memory(100, model, cap_bytes=2 * 2**30)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
)
def test_streaming_strategies_need_the_same_memory_for_any_number_of_clients(name: str) -> None:
    s = make_strategy(name)
    assert s.streaming
    assert s.memory_bytes(10_000, 2**20) == s.memory_bytes(1, 2**20) == 2 * 2**20
    s.check_memory(10_000, 2**20, cap_bytes=4 * 2**20)


# --- clipping, with any strategy ---------------------------------------------------------------


def test_clip_by_norm_scales_to_the_cap_and_leaves_small_updates_alone() -> None:
    d = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}
    assert global_norm(d) == pytest.approx(5.0)
    clipped, norm = clip_by_norm(d, 1.0)
    assert norm == pytest.approx(5.0)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert d["a"][0] == 3.0  # not in place unless asked
    same, _ = clip_by_norm(d, 10.0)
    np.testing.assert_array_equal(same["a"], d["a"])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_clip_norm_works_with_every_strategy(name: str) -> None:
    w0 = _model(np.random.default_rng(11))
    deltas = _round(12)
    max_norm = 0.5 * min(global_norm(d) for d in deltas)
    clipped = [clip_by_norm(d, max_norm)[0] for d in deltas]
    got, _ = _run(make_strategy(name, clip_norm=max_norm), w0, [deltas])
    want, _ = _run(make_strategy(name), w0, [clipped])
    _assert_close(got, want)
    assert make_strategy(name, clip_norm=max_norm).config()["clip_norm"] == max_norm


# --- registry and errors -----------------------------------------------------------------------


def test_registry_builds_every_strategy_from_its_own_config() -> None:
    assert sorted(STRATEGIES) == [
        "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox",
        "fedtrimmedavg", "fedyogi",
    ]  # fmt: skip
    for name in STRATEGIES:
        s = make_strategy(name)
        again = strategy_from_config(s.config())
        assert type(again) is type(s) and again.config() == s.config()
    assert strategy_from_config(None).name == "fedavg"
    assert strategy_from_config({}).name == "fedavg"
    assert make_strategy("FedAdam").name == "fedadam"


def test_bad_strategy_configs_say_what_is_wrong() -> None:
    with pytest.raises(StrategyError, match="unknown strategy 'fedsgd'; known: fedadagrad"):
        make_strategy("fedsgd")
    with pytest.raises(StrategyError, match="fedadam: bad parameters"):
        make_strategy("fedadam", momentum=0.9)
    with pytest.raises(StrategyError, match="beta_2 must be in"):
        make_strategy("fedyogi", beta_2=1.0)
    with pytest.raises(StrategyError, match="beta must be in"):
        make_strategy("fedtrimmedavg", beta=0.5)
    with pytest.raises(StrategyError, match="clip_norm"):
        make_strategy("fedavg", clip_norm=-1)


def test_accumulators_refuse_mismatched_updates() -> None:
    acc = WeightedMean()
    acc.add({"x": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="expected"):
        acc.add({"x": np.zeros(4, np.float32)}, 1)
    with pytest.raises(ValueError, match="different tensors"):
        acc.add({"y": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="positive"):
        acc.add({"x": np.zeros(3, np.float32)}, 0)
    with pytest.raises(ValueError, match="no updates"):
        WeightedMean().result()
    stacked = make_strategy("fedmedian").accumulator(1)
    stacked.add({"x": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="more than the 1 updates"):
        stacked.add({"x": np.zeros(3, np.float32)}, 1)


# --- partial sums (hierarchical aggregation) ------------------------------------------------


def _fold_in_parts(deltas: list[Weights], counts: list[int], parts: int) -> Weights:
    """Contiguous runs into their own accumulators, their sums added in order."""
    total = WeightedMean()
    for p in range(parts):
        lo, hi = p * len(deltas) // parts, (p + 1) * len(deltas) // parts
        acc = WeightedMean()
        for d, n in zip(deltas[lo:hi], counts[lo:hi], strict=True):
            acc.add(d, n)
        total.add_partial(acc.partial())
    return total.result()


def test_partial_sums_added_in_order_equal_the_flat_fold_within_the_stated_bound() -> None:
    k = 200
    rng = np.random.default_rng(8)
    deltas = [_model(rng, 0.1) for _ in range(k)]
    counts = [int(c) for c in rng.integers(1, 5000, k)]
    flat = WeightedMean()
    for d, n in zip(deltas, counts, strict=True):
        flat.add(d, n)
    want = flat.result()
    u = 2.0**-53
    total = float(sum(counts))
    for parts in (2, 3, 7, k):
        got = _fold_in_parts(deltas, counts, parts)
        for name in SHAPES:
            # WeightedMean's docstring: 2 (K-1) u sum n_k |d_k| / sum n_k, plus the
            # rounding of the two divisions.
            mass = sum(
                n * np.abs(d[name].astype(np.float64)) for d, n in zip(deltas, counts, strict=True)
            )
            bound = 2 * (k - 1) * u * mass / total + 2 * u * np.abs(want[name])
            assert np.all(np.abs(got[name] - want[name]) <= bound), (parts, name)
    # Rebracketing does change some last bits: the bound is not vacuous.
    some = _fold_in_parts(deltas, counts, 7)
    assert any(not np.array_equal(some[n], want[n]) for n in SHAPES)


def test_one_partial_sum_is_the_flat_fold_bit_for_bit() -> None:
    deltas = _round(9, k=len(COUNTS))
    flat = WeightedMean()
    for d, n in zip(deltas, COUNTS, strict=True):
        flat.add(d, n)
    want, got = flat.result(), _fold_in_parts(deltas, COUNTS, 1)
    for name in SHAPES:
        assert got[name].tobytes() == want[name].tobytes()


def test_a_partial_sum_is_undivided_and_finishes_its_accumulator() -> None:
    acc = WeightedMean()
    acc.add({"x": np.full(2, 1.0, np.float32)}, 3)
    acc.add({"x": np.full(2, 2.0, np.float32)}, 5)
    part = acc.partial()
    assert (part.count, part.total_weight) == (2, 8.0)
    np.testing.assert_array_equal(part.sums["x"], [13.0, 13.0])
    with pytest.raises(ValueError, match="already taken"):
        acc.add({"x": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="partial\\(\\) took the sums"):
        acc.result()
    into = WeightedMean()
    into.add_partial(part)
    into.add({"x": np.full(2, 4.0, np.float32)}, 2)  # parts and single updates mix
    np.testing.assert_array_equal(into.result()["x"], [2.1, 2.1])
    with pytest.raises(ValueError, match="no updates"):
        WeightedMean().partial()


def test_add_partial_refuses_what_it_cannot_add() -> None:
    acc = WeightedMean()
    acc.add_partial(PartialSum({"x": np.zeros(3)}, 2.0, 1))
    with pytest.raises(ValueError, match="expected float64\\[3\\]"):
        acc.add_partial(PartialSum({"x": np.zeros(4)}, 2.0, 1))
    with pytest.raises(ValueError, match="expected float64"):
        acc.add_partial(PartialSum({"x": np.zeros(3, np.float32)}, 2.0, 1))
    with pytest.raises(ValueError, match="different tensors"):
        acc.add_partial(PartialSum({"y": np.zeros(3)}, 2.0, 1))
    with pytest.raises(ValueError, match="positive weight"):
        acc.add_partial(PartialSum({"x": np.zeros(3)}, 0.0, 1))
