"""A SecAgg+ round end to end, embedded (simulation.secagg_sim): the orchestrator's
sub-state machine, devices training on digits, the worker's unmasking; and the machine's
refusals."""

from __future__ import annotations

import numpy as np
import pytest

from devices.secagg import MASKED, float_layout
from devices.secagg import context_of as device_context
from orchestrator.state import secagg as sm
from protocol import codec
from protocol.secagg import SecAggConfig, dequantize_mean, unflatten
from protocol.secagg.ring import add
from simulation.secagg_sim import SecAggFederation, SecAggSimOptions
from workers.tasks.secagg import fedavg_step


@pytest.fixture(scope="module")
def federation() -> SecAggFederation:
    return SecAggFederation(SecAggSimOptions(clients=10, drop_after=0.3, drop_before=1))


def test_round_with_dropouts_equals_fedavg_of_the_survivors_quantised_updates(
    federation: SecAggFederation,
) -> None:
    out = federation.round(1)
    assert out.failure is None
    assert len(out.dropped_before) == 1 and len(out.dropped_after) == 3
    # Those that vanished after masking count: their input arrived; the others do not.
    assert set(out.survivors) == set(federation.devices) - set(out.dropped_before)
    total = np.zeros_like(federation.devices[out.survivors[0]].last_quantized)
    for cid in out.survivors:
        total = add(total, federation.devices[cid].last_quantized)
    samples = sum(federation.devices[c].num_samples for c in out.survivors)
    mean = dequantize_mean(total, samples, out.scale)
    expected = fedavg_step(out.base, _unflat(mean, out.base))
    assert all(np.array_equal(out.model[n], expected[n]) for n in expected)
    assert out.accuracy > 0.1


def _unflat(vec: np.ndarray, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return unflatten(vec, float_layout(base))


def test_no_stored_blob_reveals_an_update(federation: SecAggFederation) -> None:
    federation.blobs.clear()
    federation.round(2)
    assert federation.blobs
    for blob in federation.blobs.values():
        tensors = codec.decode(blob).tensors
        assert list(tensors) == [MASKED]  # nothing but the masked vector
        y = tensors[MASKED].astype(np.float64)
        best = max(
            abs(np.corrcoef(y, d.last_quantized.view(np.int32))[0, 1])
            for d in federation.devices.values()
            if d.last_quantized is not None
        )
        # The max over every blob x device pair of |r| of independent vectors is ~N(0, 1/n)
        # each; 6 sigma keeps the test meaningful (a revealing blob has r near 1) without
        # flaking on the multiple comparisons (4 sigma failed about 1 run in 200).
        assert best < 6 / np.sqrt(y.size)


def test_below_the_threshold_the_round_fails_with_a_reason_and_keeps_the_model() -> None:
    fed = SecAggFederation(SecAggSimOptions(clients=6, drop_after=0.7))
    before = {n: v.copy() for n, v in fed.weights.items()}
    out = fed.round(1)
    assert out.failure is not None and "fewer than the threshold" in out.failure
    assert all(np.array_equal(fed.weights[n], before[n]) for n in before)


def test_device_and_orchestrator_bind_the_same_context() -> None:
    assert device_context("r", 3, 2) == sm.context_of("r", 3, 2)


KEYS = {c: sm.Keys(f"{i:02x}" * 32, f"{i + 16:02x}" * 32, 10) for i, c in enumerate("abcde")}


def _advertised() -> sm.SecAggRound:
    r = sm.start("run", 1, 1, tuple("abcde"), SecAggConfig(degree=2), "00" * 32, now=0, stage_s=10)
    for c, k in KEYS.items():
        r, eff = sm.step(r, sm.KeysIn(c, k), 0)
    assert r.stage is sm.Stage.SHARE and isinstance(eff[-1], sm.SendRoster)
    return r


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (sm.KeysIn("a", KEYS["a"]), "arrived in stage share"),
        (sm.SharesIn("z", {"a": "x"}), "advertised no keys"),
        (sm.SharesIn("a", {"b": "x", "c": "x", "d": "x"}), "one box to each neighbour"),
        (sm.MaskedInput("a", "ref", 10), "arrived in stage share"),
    ],
)
def test_the_machine_refuses_out_of_stage_and_off_graph_inputs(
    event: sm.SecAggInput, why: str
) -> None:
    r = _advertised()
    after, eff = sm.step(r, event, 1)
    assert after is r and isinstance(eff[0], sm.SecAggRefused) and why in eff[0].reason


def test_stage_deadlines_move_on_without_the_silent() -> None:
    r = _advertised()
    g = r.graph
    for c in "abcd":  # e never shares
        r, _ = sm.step(r, sm.SharesIn(c, {j: "x" for j in g[c]}), 1)
    assert r.stage is sm.Stage.SHARE
    r, eff = sm.step(r, sm.Tick(), 11)
    assert r.stage is sm.Stage.COLLECT and r.sharers == tuple("abcd")
    assert {e.to for e in eff if isinstance(e, sm.SendInbox)} == set("abcd")
    _, eff = sm.step(r, sm.MaskedInput("a", "ref", 9), 12)
    assert "were announced" in eff[0].reason
