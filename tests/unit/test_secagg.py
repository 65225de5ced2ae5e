"""SecAgg+ protocol core: exact unmasking with dropouts, clean failure below the threshold,
masked inputs that say nothing about the update, and a device that will not reveal both
secrets of one peer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.secagg import (
    DeviceSession,
    SecAggConfig,
    SecAggError,
    choose_scale,
    dequantize_mean,
    expand,
    neighbours,
    quantize,
    shamir,
    unmask_sum,
)
from protocol.secagg.ring import MODULUS, add

CONTEXT = b"run-test/round-1/attempt-1"


def _sessions(ids: list[str], degree: int, threshold: int, seed: bytes) -> dict[str, DeviceSession]:
    return {cid: DeviceSession(cid, CONTEXT, seed, degree, threshold) for cid in ids}


def _run_round(
    inputs: dict[str, np.ndarray],
    degree: int,
    threshold: int,
    *,
    drop_before_share: frozenset[str] = frozenset(),
    drop_after_mask: frozenset[str] = frozenset(),
    silent_at_unmask: frozenset[str] = frozenset(),
    seed: bytes = b"graph-seed",
) -> np.ndarray:
    """One round through all four stages, the orchestrator's routing done inline."""
    devs = _sessions(sorted(inputs), degree, threshold, seed)
    roster = {cid: d.advertise() for cid, d in devs.items()}
    sharers = [cid for cid in devs if cid not in drop_before_share]
    outboxes = {cid: devs[cid].share_keys(roster) for cid in sharers}
    for cid in sharers:
        devs[cid].receive_shares({s: box[cid] for s, box in outboxes.items() if cid in box})
    masked = {cid: devs[cid].mask(inputs[cid]) for cid in sharers}
    survivors = {cid: v for cid, v in masked.items() if cid not in drop_after_mask}
    dropped = sorted(set(sharers) - set(survivors))
    revealed = {
        cid: devs[cid].unmask(sorted(survivors), dropped)
        for cid in survivors
        if cid not in silent_at_unmask
    }
    return unmask_sum(
        survivors,
        roster,
        sharers,
        revealed,
        graph_seed=seed,
        degree=degree,
        threshold=threshold,
        context=CONTEXT,
    )


def _ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total = add(total, v)
    return total


def test_unmasked_sum_equals_fedavg_of_the_quantised_updates_with_unequal_counts() -> None:
    rng = np.random.default_rng(1)
    ids = [f"c{i:02d}" for i in range(10)]
    counts = {cid: int(rng.integers(5, 400)) for cid in ids}
    updates = {cid: rng.normal(0, 0.5, size=257) for cid in ids}
    clip = 2.0
    dropped = frozenset({"c01", "c04", "c07"})  # 30 % after sending masked input
    survivors = [c for c in ids if c not in dropped]
    # The scale covers everyone announced; fewer survivors only leave more headroom.
    scale = choose_scale(clip, sum(counts.values()))
    q = {cid: quantize(updates[cid], counts[cid], clip, scale) for cid in ids}
    cfg = SecAggConfig(clip=clip)
    total = _run_round(q, cfg.degree_for(10), cfg.threshold_for(10), drop_after_mask=dropped)
    assert np.array_equal(total, _ring_sum([q[c] for c in survivors]))  # exact, in the ring
    mean = dequantize_mean(total, sum(counts[c] for c in survivors), scale)
    w = np.array([counts[c] for c in survivors], dtype=np.float64)
    fedavg = (w[:, None] * np.stack([np.clip(updates[c], -clip, clip) for c in survivors])).sum(
        0
    ) / w.sum()
    bound = 0.5 * len(survivors) / (scale * w.sum())
    assert np.max(np.abs(mean - fedavg)) <= bound + 1e-6  # float32 of the result


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 12),
    degree=st.integers(2, 11),
    data=st.data(),
)
def test_any_survivor_set_at_least_the_threshold_unmasks_exactly(
    n: int, degree: int, data: st.DataObject
) -> None:
    ids = [f"d{i}" for i in range(n)]
    cfg = SecAggConfig(degree=degree)
    k, t = cfg.degree_for(n), cfg.threshold_for(n)
    seed = data.draw(st.binary(min_size=1, max_size=16))
    inputs = {
        cid: np.array(
            data.draw(st.lists(st.integers(0, MODULUS - 1), min_size=7, max_size=7)),
            dtype=np.uint32,
        )
        for cid in ids
    }
    before = frozenset(data.draw(st.sets(st.sampled_from(ids), max_size=n // 4)))
    after = frozenset(data.draw(st.sets(st.sampled_from(ids), max_size=n // 3))) - before
    survivors = [c for c in ids if c not in before | after]
    # The graph is over everyone who advertised keys, those who drop before sharing too.
    near = neighbours(ids, seed, k)
    # Every secret the server needs has at least t holders among the survivors.
    needed_ok = (
        all(len(set(near[c]) & set(survivors)) >= t for c in ids if c not in before)
        and len(survivors) >= t
    )
    if needed_ok:
        total = _run_round(inputs, k, t, drop_before_share=before, drop_after_mask=after, seed=seed)
        assert np.array_equal(total, _ring_sum([inputs[c] for c in survivors]))
    else:
        with pytest.raises(SecAggError, match="fewer than the threshold"):
            _run_round(inputs, k, t, drop_before_share=before, drop_after_mask=after, seed=seed)


def test_below_the_threshold_fails_with_a_reason() -> None:
    ids = [f"c{i}" for i in range(6)]
    inputs = {c: np.arange(5, dtype=np.uint32) for c in ids}
    # degree 5 (complete), threshold 3: four drop after masking, two survive.
    with pytest.raises(SecAggError, match="2 survivors, fewer than the threshold 3"):
        _run_round(inputs, 5, 3, drop_after_mask=frozenset(ids[:4]))
    # Enough survivors, but too few of them answer the unmasking request.
    with pytest.raises(SecAggError, match=r"shares of .* fewer than the threshold 3"):
        _run_round(
            inputs, 5, 3, drop_after_mask=frozenset(ids[:2]), silent_at_unmask=frozenset(ids[2:4])
        )


def test_a_masked_input_is_uncorrelated_with_the_update() -> None:
    rng = np.random.default_rng(3)
    ids = [f"c{i}" for i in range(5)]
    size = 50_000
    updates = {c: rng.normal(0, 1, size=size) for c in ids}
    scale = choose_scale(4.0, 5 * 100)
    q = {c: quantize(updates[c], 100, 4.0, scale) for c in ids}
    devs = _sessions(ids, 4, 3, b"s")
    roster = {c: d.advertise() for c, d in devs.items()}
    boxes = {c: d.share_keys(roster) for c, d in devs.items()}
    for c, d in devs.items():
        d.receive_shares({s: b[c] for s, b in boxes.items() if c in b})
    y = devs["c0"].mask(q["c0"]).astype(np.float64)
    x = updates["c0"]
    r = np.corrcoef(x, y)[0, 1]
    assert abs(r) < 4 / np.sqrt(size)  # ~0: four standard errors of a zero correlation
    # and the masked words are uniform over the ring: mean 2^31, spread of a uniform
    assert abs(y.mean() / MODULUS - 0.5) < 0.01
    assert abs(y.std() / MODULUS - (1 / 12) ** 0.5) < 0.01
    # The plain quantised update, by contrast, is nearly a function of the update.
    assert np.corrcoef(x, q["c0"].view(np.int32))[0, 1] > 0.99


def _masked_pair() -> dict[str, DeviceSession]:
    ids = ["a", "b", "c", "d"]
    devs = _sessions(ids, 3, 2, b"s")
    roster = {c: d.advertise() for c, d in devs.items()}
    boxes = {c: d.share_keys(roster) for c, d in devs.items()}
    for c, d in devs.items():
        d.receive_shares({s: b[c] for s, b in boxes.items() if c in b})
        d.mask(np.zeros(3, dtype=np.uint32))
    return devs


def test_a_device_refuses_both_shares_of_one_peer_in_one_request() -> None:
    devs = _masked_pair()
    with pytest.raises(SecAggError, match=r"both kinds of share of \['b'\]"):
        devs["a"].unmask(["a", "b", "c"], ["b"])


def test_a_device_refuses_both_shares_of_one_peer_over_two_requests() -> None:
    devs = _masked_pair()
    first = devs["a"].unmask(["a", "b", "c", "d"], [])
    assert first["b"][0] == "b"
    with pytest.raises(SecAggError, match="b's b share was revealed already"):
        devs["a"].unmask(["a", "c", "d"], ["b"])
    # asking again for the same kind is harmless and answered
    assert devs["a"].unmask(["a", "b", "c", "d"], [])["b"] == first["b"]


def test_share_boxes_open_only_for_their_recipient() -> None:
    devs = _sessions(["a", "b", "c"], 2, 2, b"s")
    roster = {c: d.advertise() for c, d in devs.items()}
    boxes = {c: d.share_keys(roster) for c, d in devs.items()}
    # The box a sent to b, handed to c as if from a: authenticated context differs.
    with pytest.raises(SecAggError, match="does not open"):
        devs["c"].receive_shares({"a": boxes["a"]["b"]})
    flipped = bytearray(boxes["a"]["b"])
    flipped[-1] ^= 1
    with pytest.raises(SecAggError, match="does not open"):
        devs["b"].receive_shares({"a": bytes(flipped)})


def test_a_roster_without_the_devices_own_keys_is_refused() -> None:
    devs = _sessions(["a", "b", "c"], 2, 2, b"s")
    roster = {c: d.advertise() for c, d in devs.items()}
    forged = dict(roster, a=roster["b"])
    with pytest.raises(SecAggError, match="own keys"):
        devs["a"].share_keys(forged)
    with pytest.raises(SecAggError, match="repeats a key"):
        devs["c"].share_keys(dict(roster, a=roster["b"]))


def test_forged_key_shares_are_caught_against_the_advertised_key() -> None:
    ids = ["a", "b", "c", "d", "e"]
    devs = _sessions(ids, 4, 3, b"s")
    roster = {c: d.advertise() for c, d in devs.items()}
    boxes = {c: d.share_keys(roster) for c, d in devs.items()}
    for c, d in devs.items():
        d.receive_shares({s: b[c] for s, b in boxes.items() if c in b})
    masked = {c: devs[c].mask(np.zeros(4, dtype=np.uint32)) for c in ids if c != "e"}
    revealed = {c: dict(devs[c].unmask(list(masked), ["e"])) for c in masked}
    kind, share = revealed["a"]["e"]
    revealed["a"]["e"] = (kind, shamir.to_bytes((shamir.from_bytes(share) + 1) % shamir.PRIME))
    with pytest.raises(SecAggError):
        unmask_sum(
            masked, roster, ids, revealed, graph_seed=b"s", degree=4, threshold=3, context=CONTEXT
        )


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), t=st.integers(1, 6), extra=st.integers(0, 4))
def test_shamir_any_t_shares_rebuild_and_fewer_refuse(secret: bytes, t: int, extra: int) -> None:
    xs = list(range(1, t + extra + 1))
    shares = shamir.split(secret, t, xs)
    picked = dict(list(shares.items())[extra:])
    assert shamir.combine(picked, t) == secret
    if t > 1:
        with pytest.raises(SecAggError, match="fewer than the threshold"):
            shamir.combine(dict(list(shares.items())[: t - 1]), t)


def test_graph_is_symmetric_regular_and_agreed_from_the_seed() -> None:
    ids = [f"c{i}" for i in range(50)]
    g = neighbours(ids, b"round-seed", 8)
    assert all(len(v) == 8 for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])
    assert neighbours(list(reversed(ids)), b"round-seed", 8) == g
    assert neighbours(ids, b"other-seed", 8) != g
    assert all(len(v) == 3 for v in neighbours(ids[:4], b"x", 8).values())  # complete


def test_prg_is_deterministic_and_seed_bound() -> None:
    s = os.urandom(32)
    assert np.array_equal(expand(s, 1000), expand(s, 1000))
    assert np.array_equal(expand(s, 10), expand(s, 1000)[:10])
    assert not np.array_equal(expand(s, 10), expand(os.urandom(32), 10))
    with pytest.raises(SecAggError):
        expand(b"short", 3)


def test_quantisation_clips_and_never_wraps_at_the_chosen_scale() -> None:
    clip, counts = 1.5, [1000, 7, 3000]
    scale = choose_scale(clip, sum(counts))
    worst = [quantize(np.full(4, 9.0), n, clip, scale) for n in counts]
    total = _ring_sum(worst)
    assert np.allclose(dequantize_mean(total, sum(counts), scale), clip, atol=1e-6)
    neg = _ring_sum([quantize(np.full(4, -9.0), n, clip, scale) for n in counts])
    assert np.allclose(dequantize_mean(neg, sum(counts), scale), -clip, atol=1e-6)
    with pytest.raises(SecAggError, match="does not fit"):
        choose_scale(1e9, 10)


def test_config_degree_and_threshold() -> None:
    cfg = SecAggConfig()
    assert cfg.degree_for(10) == 8 and cfg.threshold_for(10) == 4
    assert cfg.degree_for(5) == 4 and cfg.threshold_for(5) == 2
    assert SecAggConfig(threshold=0.5).threshold_for(10) == 5
    assert cfg.degree_for(100) == 14
    assert SecAggConfig.from_dict({"degree": 6, "clip": 2.0}).degree == 6
    with pytest.raises(SecAggError, match="unknown"):
        SecAggConfig.from_dict({"degre": 6})


def test_a_share_crafted_to_shift_the_secret_is_caught_when_a_spare_share_exists() -> None:
    from protocol.secagg import shamir

    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    # The holder of x = 2 knows its Lagrange weight for {1, 2, 3} (public points) and
    # moves the rebuilt secret by delta.
    weight = (-1) * (-3) * pow((2 - 1) * (2 - 3), -1, shamir.PRIME) % shamir.PRIME
    delta = 7
    crafted = dict(shares)
    crafted[2] = (shares[2] + delta * pow(weight, -1, shamir.PRIME)) % shamir.PRIME
    exact = {x: crafted[x] for x in (1, 2, 3)}
    shifted = int.from_bytes(shamir.combine(exact, 3), "big")
    assert shifted == int.from_bytes(secret, "big") + delta  # t shares cannot tell
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine(crafted, 3)
    assert shamir.combine(shares, 3) == secret  # honest spares agree
