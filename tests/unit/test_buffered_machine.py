"""Async runs (FedBuff) on the pure round machine, and the staleness-weighted fold.

The replica below is a second, independent implementation of the rules in
``orchestrator/state/buffered.py`` written as plain FedBuff pseudo-code (a dict of
outstanding tickets, a list as the buffer, an integer version): fed the same arrival
order, the machine must produce the same version steps with the same stalenesses.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learning.staleness import histogram, weight
from learning.strategies import strategy_from_config
from orchestrator.state import (
    AggregationSucceeded,
    Autorun,
    ClientJoined,
    ClientLeft,
    ClientReady,
    CloseRound,
    Dispatched,
    EvaluationFinished,
    Federation,
    Ignored,
    OpenRound,
    Rejected,
    StaleDropped,
    Tick,
    UpdateBuffered,
    UpdateReceived,
    VersionStepOpened,
    from_dict,
    step,
    to_dict,
)
from orchestrator.state.policy import RoundPolicy
from orchestrator.state.serde import join, split
from protocol.messages import RoundState
from workers.tasks.buffered import buffered_delta, clip_updates, robust_buffered_delta


def _fed(clients: int, **policy: object) -> Federation:
    fed = Federation("run", RoundPolicy(mode="async", **policy))  # type: ignore[arg-type]
    for i in range(clients):
        fed, _ = step(fed, ClientJoined(f"c{i}"), 0.0)
        fed, _ = step(fed, ClientReady(f"c{i}"), 0.0)
    return fed


def _finish_step(fed: Federation, now: float, effects: list[object] | None = None) -> Federation:
    """Play the worker and the evaluator for the step in flight (their effects go to
    ``effects``)."""
    rnd = fed.round
    assert rnd is not None and rnd.state is RoundState.AGGREGATING
    fed, eff = step(fed, AggregationSucceeded(rnd.number, fed.model_version + 1), now)
    fed, eff2 = step(fed, EvaluationFinished(rnd.number, {"accuracy": 0.5}), now)
    if effects is not None:
        effects.extend([*eff, *eff2])
    return fed


# --- the staleness weights ------------------------------------------------------------------


def test_staleness_weights() -> None:
    assert [weight("poly", s) for s in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert weight("constant", 7) == 1.0
    assert [weight("hinge", s) for s in (0, 4, 5, 6)] == [1.0, 1.0, 1 / 11, 1 / 21]
    with pytest.raises(ValueError, match="unknown staleness"):
        weight("cubic", 1)
    with pytest.raises(ValueError, match="negative"):
        weight("poly", -1)
    assert histogram([2, 0, 2]) == {"0": 1, "2": 2}


def test_buffered_delta_is_fedavg_when_fresh_and_discounts_stale() -> None:
    a, b = {"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, -2.0])}
    fresh, st_ = buffered_delta([("b", 3, 5, b), ("a", 1, 5, a)], 5, "poly", 1.0)
    np.testing.assert_allclose(fresh["w"], (1 * a["w"] + 3 * b["w"]) / 4)
    assert st_ == [0, 0]
    # a trained on version 2 (3 behind): weight 1/2; b fresh. Server lr 0.5 halves it all.
    stale, st_ = buffered_delta([("a", 1, 2, a), ("b", 3, 5, b)], 5, "poly", 0.5)
    np.testing.assert_allclose(stale["w"], 0.5 * (0.5 * 1 * a["w"] + 3 * b["w"]) / 4)
    assert st_ == [3, 0]


def test_clipping_holds_over_a_buffer() -> None:
    big, small = {"w": np.array([3.0, 4.0])}, {"w": np.array([0.3, 0.4])}
    clipped, n = clip_updates([("a", 1, 0, big), ("b", 1, 0, small)], 1.0)
    assert n == 1
    np.testing.assert_allclose(clipped[0][3]["w"], [0.6, 0.8])
    np.testing.assert_allclose(clipped[1][3]["w"], small["w"])
    assert clip_updates([("a", 1, 0, big)], None) == ([("a", 1, 0, big)], 0)


def test_robust_strategies_reduce_the_weighted_buffer() -> None:
    """FedMedian over a buffer: the median of f(s_i) * d_i, each update once whatever its
    samples, times the server lr; FedTrimmedAvg likewise with its trimmed mean."""
    d = [np.array([1.0, -4.0]), np.array([8.0, 2.0]), np.array([2.0, 0.0])]
    ups = [("a", 1, 5, {"w": d[0]}), ("b", 100, 2, {"w": d[1]}), ("c", 1, 5, {"w": d[2]})]
    median = strategy_from_config({"name": "fedmedian"})
    delta, st_ = robust_buffered_delta(ups, 5, "poly", 0.5, median.reduce)
    assert st_ == [0, 3, 0]
    scaled = np.stack([d[0], 0.5 * d[1], d[2]])  # b is 3 behind: weight 1/2
    np.testing.assert_allclose(delta["w"], 0.5 * np.median(scaled, axis=0))
    trimmed = strategy_from_config({"name": "fedtrimmedavg", "beta": 0.34})
    delta, _ = robust_buffered_delta(ups, 5, "constant", 1.0, trimmed.reduce)
    np.testing.assert_allclose(delta["w"], np.median(np.stack(d), axis=0))  # 3 updates, 1 cut


# --- the machine ----------------------------------------------------------------------------


def test_slots_are_bounded_and_handed_the_newest_version() -> None:
    fed = _fed(5, buffer_size=2, concurrency=3)
    fed, eff = step(fed, Autorun(2), 1.0)
    handed = [e for e in eff if isinstance(e, Dispatched)]
    assert len(handed) == 3 == len(fed.buffer.training)
    assert {e.model_version for e in handed} == {0}
    assert len({e.ticket for e in handed}) == 3  # tickets never repeat
    first, second = fed.buffer.training[:2]
    fed, eff = step(fed, UpdateReceived(first.client_id, first.ticket, "s1", 10), 2.0)
    assert any(isinstance(e, UpdateBuffered) for e in eff)
    # The freed slot went to a waiting client at once: still 3 train.
    assert len(fed.buffer.training) == 3
    fed, eff = step(fed, UpdateReceived(second.client_id, second.ticket, "s2", 10), 3.0)
    opened = [e for e in eff if isinstance(e, VersionStepOpened)]
    assert len(opened) == 1 and opened[0].staleness == (0, 0)
    assert fed.round is not None and fed.round.state is RoundState.AGGREGATING
    fed = _finish_step(fed, 4.0)
    assert fed.model_version == 1
    # Every later hand-out names version 1.
    _, eff = step(fed, Tick(), 5.0)
    assert all(e.model_version == 1 for e in eff if isinstance(e, Dispatched))


def test_refusals_name_their_reason() -> None:
    fed = _fed(3, buffer_size=1, max_staleness=0, concurrency=3)
    fed, _ = step(fed, Autorun(5), 1.0)
    t = fed.buffer.training
    fed, _ = step(fed, UpdateReceived(t[0].client_id, t[0].ticket, "s1", 10), 2.0)
    fed = _finish_step(fed, 3.0)  # version 1: the two others are now 1 behind, bound 0
    _, eff = step(fed, UpdateReceived(t[1].client_id, t[1].ticket, "s2", 10), 4.0)
    assert isinstance(eff[0], Rejected) and "max_staleness 0" in eff[0].reason
    _, eff = step(fed, UpdateReceived(t[0].client_id, t[0].ticket, "s1", 10), 4.0)
    assert isinstance(eff[0], Rejected) and "no outstanding ticket" in eff[0].reason
    _, eff = step(fed, OpenRound(), 4.0)
    assert isinstance(eff[0], Rejected) and "async" in eff[0].reason
    _, eff = step(fed, CloseRound(), 4.0)
    assert isinstance(eff[0], Rejected)


def test_an_update_too_stale_by_its_step_is_dropped_with_why() -> None:
    """Arrived fresh enough, then waited behind a step in flight: not folded staler than
    the bound, but dropped with the reason, and its client may train again."""
    fed = _fed(4, buffer_size=1, max_staleness=0, concurrency=4)
    fed, _ = step(fed, Autorun(5), 1.0)
    t = fed.buffer.training
    fed, _ = step(fed, UpdateReceived(t[0].client_id, t[0].ticket, "s0", 10), 2.0)
    assert fed.round is not None and fed.round.in_flight  # step 1 folds s0
    fed, eff = step(fed, UpdateReceived(t[1].client_id, t[1].ticket, "s1", 10), 2.5)
    assert any(isinstance(e, UpdateBuffered) for e in eff)  # 0 versions stale on arrival
    effects: list[object] = []
    fed = _finish_step(fed, 3.0, effects)
    (gone,) = [e for e in effects if isinstance(e, StaleDropped)]
    assert (gone.client_id, gone.ref, gone.staleness) == (t[1].client_id, "s1", 1)
    assert "max_staleness 0" in gone.reason
    assert all(u.ref != "s1" for u in fed.buffer.updates)
    assert not any(isinstance(e, VersionStepOpened) for e in effects)
    assert t[1].client_id in {x.client_id for x in fed.buffer.training}  # trains again


def test_duplicate_of_a_buffered_update_is_ignored() -> None:
    fed = _fed(2, buffer_size=5)
    fed, _ = step(fed, Autorun(1), 1.0)
    t = fed.buffer.training[0]
    fed, _ = step(fed, UpdateReceived(t.client_id, t.ticket, "s", 10), 2.0)
    again, eff = step(fed, UpdateReceived(t.client_id, t.ticket, "s", 10), 2.0)
    assert isinstance(eff[0], Ignored) and again is fed


def test_a_slot_expires_past_its_deadline_and_when_its_client_leaves() -> None:
    fed = _fed(2, buffer_size=5, deadline_s=10.0, concurrency=1)
    fed, _ = step(fed, Autorun(1), 0.0)
    (t,) = fed.buffer.training
    fed, _ = step(fed, Tick(), 11.0)
    assert all(x.ticket != t.ticket for x in fed.buffer.training)
    _, eff = step(fed, UpdateReceived(t.client_id, t.ticket, "s", 10), 12.0)
    assert isinstance(eff[0], Rejected) and "deadline" in eff[0].reason
    (u,) = fed.buffer.training
    fed, _ = step(fed, ClientLeft(u.client_id), 12.0)
    assert all(x.client_id != u.client_id for x in fed.buffer.training)


def test_the_buffer_survives_the_snapshot() -> None:
    fed = _fed(4, buffer_size=3, concurrency=3)
    fed, _ = step(fed, Autorun(2), 1.0)
    t = fed.buffer.training[0]
    fed, _ = step(fed, UpdateReceived(t.client_id, t.ticket, "s", 10), 2.0)
    assert fed.buffer.updates and fed.buffer.training
    assert from_dict(to_dict(fed)) == fed
    head, parts = split(fed)
    assert join(head, parts.items()) == fed


# --- a replica fed the same arrival order ---------------------------------------------------


class Replica:
    """FedBuff in a few lines: no slots bookkeeping beyond a dict, no states."""

    def __init__(self, k: int, max_staleness: int) -> None:
        self.k, self.max_staleness = k, max_staleness
        self.version = 0  # versions built (the newest is handed out)
        self.in_flight = False  # a step is aggregating: the next waits for it
        self.outstanding: dict[tuple[str, int], int] = {}  # (client, ticket) -> base
        self.buffer: list[tuple[str, int]] = []  # (client, base)
        self.steps: list[tuple[int, list[int]]] = []  # (base version, stalenesses)
        self.dropped: list[tuple[str, int]] = []  # (client, base) too stale to fold

    def handed(self, client: str, ticket: int, version: int) -> None:
        assert version == self.version  # always the newest
        self.outstanding[(client, ticket)] = version

    def arrive(self, client: str, ticket: int) -> bool:
        base = self.outstanding.pop((client, ticket), None)
        if base is None or self.version - base > self.max_staleness:
            return False
        self.buffer.append((client, base))
        self.maybe_step()
        return True

    def maybe_step(self) -> None:
        if not self.in_flight and len(self.buffer) >= self.k:
            take, self.buffer = self.buffer[: self.k], self.buffer[self.k :]
            self.steps.append((self.version, [self.version - b for _, b in take]))
            self.in_flight = True

    def finish(self) -> None:
        """The step in flight made a version: slots too far behind are given up."""
        self.version += 1
        self.in_flight = False
        for key, base in list(self.outstanding.items()):
            if self.version - base > self.max_staleness:
                del self.outstanding[key]
        # ... and so are buffered updates: they would be folded staler than the bound.
        keep = [(c, b) for c, b in self.buffer if self.version - b <= self.max_staleness]
        self.dropped += [(c, b) for c, b in self.buffer if (c, b) not in keep]
        self.buffer = keep
        self.maybe_step()


@settings(max_examples=60, deadline=None)
@given(
    clients=st.integers(2, 7),
    k=st.integers(1, 4),
    max_staleness=st.integers(0, 3),
    concurrency=st.integers(1, 7),
    picks=st.lists(st.integers(0, 10**6), min_size=5, max_size=80),
)
def test_machine_matches_replica_and_counts_each_update_once(
    clients: int, k: int, max_staleness: int, concurrency: int, picks: list[int]
) -> None:
    """Random arrival orders (any outstanding slot may answer next, sometimes twice, and
    sometimes a step finishes first): the machine and the replica agree on every version
    step's base and stalenesses, and no accepted update is counted twice or lost."""
    fed = _fed(clients, buffer_size=k, max_staleness=max_staleness, concurrency=concurrency)
    rep = Replica(k, max_staleness)
    fed, eff = step(fed, Autorun(10**6), 0.0)
    accepted: list[tuple[str, str]] = []
    in_steps: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    step_staleness: list[int] = []
    sent: list[tuple[str, int, str]] = []
    arrival_staleness: list[int] = []

    def absorb(effects: list[object]) -> None:
        for e in effects:
            if isinstance(e, Dispatched):
                rep.handed(e.client_id, e.ticket, e.model_version)
            elif isinstance(e, VersionStepOpened):
                in_steps.extend((u.client_id, u.ref) for u in e.updates)
                step_staleness.extend(e.staleness)
                assert e.base_model_version == rep.steps[-1][0]
                assert list(e.staleness) == rep.steps[-1][1]
            elif isinstance(e, StaleDropped):
                dropped.append((e.client_id, e.ref))

    absorb(eff)
    now = 0.0
    for n, pick in enumerate(picks):
        now += 0.01
        rnd = fed.round
        if pick % 5 == 0 and rnd is not None and rnd.state is RoundState.AGGREGATING:
            done: list[object] = []
            fed = _finish_step(fed, now, done)
            rep.finish()
            absorb(done)
            continue
        if pick % 7 == 0 and sent:  # a re-delivery of something sent before
            cid, ticket, ref = sent[pick % len(sent)]
        elif fed.buffer.training:
            t = fed.buffer.training[pick % len(fed.buffer.training)]
            cid, ticket, ref = t.client_id, t.ticket, f"u{n}"
        else:
            continue
        sent.append((cid, ticket, ref))
        before_steps = len(rep.steps)
        fed, eff = step(fed, UpdateReceived(cid, ticket, ref, 10), now)
        ok = any(isinstance(e, UpdateBuffered) for e in eff)
        arrival_staleness.extend(e.staleness for e in eff if isinstance(e, UpdateBuffered))
        assert ok == rep.arrive(cid, ticket) or isinstance(eff[0], Ignored)
        if ok:
            accepted.append((cid, ref))
        absorb(eff)
        assert len(rep.steps) - before_steps == sum(isinstance(e, VersionStepOpened) for e in eff)
    waiting = [(u.client_id, u.ref) for u in fed.buffer.updates]
    assert len(set(accepted)) == len(accepted)  # nothing accepted twice
    # Each in exactly one place: a step, the buffer, or dropped with a reason.
    assert sorted(in_steps + waiting + dropped) == sorted(accepted)
    done = set(in_steps) | set(dropped)
    assert waiting == [(c, r) for c, r in accepted if (c, r) not in done]
    assert len(dropped) == len(rep.dropped)
    assert len(fed.buffer.training) <= concurrency
    # The bound holds on arrival and when folded.
    assert all(s <= max_staleness for s in arrival_staleness)
    assert all(s <= max_staleness for s in step_staleness)
