"""The round state machine as a transition table, and the paper's scenes as pure logic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from orchestrator.state import (
    SIGNAL_RULES,
    AggregationFailed,
    AggregationSucceeded,
    Autorun,
    AutorunChanged,
    ClientJoined,
    ClientKicked,
    ClientLeft,
    ClientReady,
    ClientSignal,
    ClientStateChanged,
    ClientWentOffline,
    CloseRound,
    DispatchAggregate,
    DispatchEvaluate,
    Effect,
    EvaluationFinished,
    Federation,
    Heartbeat,
    Ignored,
    Input,
    OpenedRound,
    OpenRound,
    Pause,
    PauseChanged,
    Rejected,
    Resume,
    RoundClosed,
    RoundDone,
    RoundFailed,
    RoundPolicy,
    RoundRetried,
    StopAutorun,
    Tick,
    Update,
    UpdateAccepted,
    UpdateReceived,
    command_event,
    from_dict,
    select_clients,
    step,
    to_dict,
)
from protocol.messages import ClientState, CommandAction, Event, RoundState

T0 = 1_000_000.0
POLICY = RoundPolicy(
    min_clients=2,
    quorum_fraction=0.5,
    deadline_s=100.0,
    heartbeat_timeout_s=30.0,
    max_attempts=2,
    max_aggregation_retries=1,
)


class Sim:
    """Feeds events to ``step`` at a clock it advances, keeping the state and every effect."""

    def __init__(self, policy: RoundPolicy = POLICY, run_id: str = "run-1") -> None:
        self.fed = Federation(run_id, policy)
        self.now = T0
        self.log: list[Effect] = []

    def __call__(self, *events: Input) -> list[Effect]:
        out: list[Effect] = []
        for event in events:
            self.fed, effects = step(self.fed, event, self.now)
            out += effects
        self.log += out
        return out

    def advance(self, seconds: float) -> list[Effect]:
        self.now += seconds
        return self(Tick())

    def ready(self, *ids: str) -> Sim:
        self.join_ready(*ids)
        return self

    def join_ready(self, *ids: str) -> list[Effect]:
        return self(*(e for cid in ids for e in (ClientJoined(cid), ClientReady(cid))))

    def later(self, seconds: float, *alive: str) -> list[Effect]:
        """``seconds`` pass; ``alive`` send a heartbeat just before the tick."""
        self.now += seconds
        self(*(Heartbeat(c) for c in alive))
        return self(Tick())

    def report(self, *ids: str, ref: str = "") -> list[Effect]:
        assert self.fed.round is not None
        n = self.fed.round.number
        return self(*(UpdateReceived(c, n, ref or f"{c}@{n}", 10) for c in ids))

    def finish_round(self) -> list[Effect]:
        """Everyone expected reports; aggregation and evaluation succeed."""
        rnd = self.fed.round
        assert rnd is not None
        out = self.report(*rnd.expected)
        version = self.fed.model_version + 1
        return out + self(
            AggregationSucceeded(rnd.number, version),
            EvaluationFinished(rnd.number, {"accuracy": 0.5}),
        )

    def state(self, cid: str) -> ClientState:
        return self.fed.clients[cid].state


def of(cls: type, effects: list[Effect]) -> list:
    return [e for e in effects if isinstance(e, cls)]


def names(n: int) -> list[str]:
    return [f"client_{i}" for i in range(1, n + 1)]


# --- situations a table row starts from -----------------------------------------------------


def idle() -> Sim:
    return Sim().ready("c0", "c1", "c2")


def round_open() -> Sim:
    sim = idle()
    sim(OpenRound())
    return sim


def aggregating() -> Sim:
    sim = round_open()
    sim.report("c0", "c1", "c2")
    return sim


def evaluating() -> Sim:
    sim = aggregating()
    sim(AggregationSucceeded(1, 1))
    return sim


def done() -> Sim:
    sim = evaluating()
    sim(EvaluationFinished(1, {}))
    return sim


def paused() -> Sim:
    sim = idle()
    sim(Pause())
    return sim


def with_left() -> Sim:
    sim = idle()
    sim(ClientLeft("c0"))
    return sim


def with_kicked() -> Sim:
    sim = idle()
    sim(ClientKicked("c0"))
    return sim


def half_reported() -> Sim:
    sim = Sim(RoundPolicy(min_clients=2, quorum_count=2)).ready("c0", "c1", "c2")
    sim(OpenRound())
    sim.report("c0")
    return sim


def _then(sim: Sim, *events: Input) -> Sim:
    sim(*events)
    return sim


def _updates(number: int, *ids: str) -> list[Input]:
    return [UpdateReceived(c, number, f"{c}@{number}", 10) for c in ids]


@dataclass(frozen=True)
class Row:
    name: str
    given: Callable[[], Sim]
    when: Input
    then: tuple[type, ...]
    reason: str = ""


TABLE = [
    Row("a new client joins", idle, ClientJoined("c9"), (ClientStateChanged,)),
    Row("a client joining twice is ignored", idle, ClientJoined("c0"), (Ignored,), "already"),
    Row("an unknown client cannot be ready", idle, ClientReady("c9"), (Rejected,), "unknown"),
    Row("a ready client saying ready is only alive", idle, ClientReady("c0"), ()),
    Row(
        "a ready client cannot claim to train",
        idle,
        ClientSignal("c0", ClientState.TRAINING),
        (Rejected,),
        "cannot signal training",
    ),
    Row(
        "a training client saying update is only alive",
        round_open,
        ClientSignal("c0", ClientState.UPDATE),
        (),
    ),
    Row(
        "a training client cannot go back to ready",
        round_open,
        ClientReady("c0"),
        (Rejected,),
        "c0 is training",
    ),
    Row("a heartbeat changes no state", round_open, Heartbeat("c0"), ()),
    Row("an offline client cannot heartbeat", with_left, Heartbeat("c0"), (Rejected,), "offline"),
    Row("a client that left may join again", with_left, ClientJoined("c0"), (ClientStateChanged,)),
    Row("a client leaving twice is ignored", with_left, ClientLeft("c0"), (Ignored,)),
    Row("a kicked client cannot join again", with_kicked, ClientJoined("c0"), (Rejected,), "kick"),
    Row("a kick repeated is ignored", with_kicked, ClientKicked("c0"), (Ignored,)),
    Row("kicking an unknown client is rejected", idle, ClientKicked("c9"), (Rejected,)),
    Row(
        "an update for a closed round is rejected",
        lambda: _then(round_open(), *_updates(1, "c0", "c1"), CloseRound()),
        UpdateReceived("c2", 1, "x", 1),
        (Rejected,),
        "round 1 is not open",
    ),
    Row(
        "an update for a round not yet open is rejected",
        round_open,
        UpdateReceived("c0", 2, "x", 1),
        (Rejected,),
        "round 2 is not open",
    ),
    Row(
        "an update from an unselected client is rejected",
        lambda: round_open().ready("c9"),
        UpdateReceived("c9", 1, "x", 1),
        (Rejected,),
        "c9 is not selected for round 1",
    ),
    Row(
        "an update from a dropped client is rejected",
        lambda: _then(round_open(), ClientLeft("c0"), ClientJoined("c0")),
        UpdateReceived("c0", 1, "x", 1),
        (Rejected,),
        "dropped",
    ),
    Row(
        "a duplicate update is ignored",
        half_reported,
        UpdateReceived("c0", 1, "other", 3),
        (Ignored,),
        "duplicate",
    ),
    Row(
        "a re-delivered update after the round closed is ignored",
        aggregating,
        UpdateReceived("c0", 1, "c0@1", 10),
        (Ignored,),
        "duplicate",
    ),
    Row(
        "an update without samples is rejected",
        round_open,
        UpdateReceived("c0", 1, "x", 0),
        (Rejected,),
        "sample",
    ),
    Row("an update is accepted", round_open, UpdateReceived("c0", 1, "x", 5), (UpdateAccepted,)),
    Row("opening while a round is open is rejected", round_open, OpenRound(), (Rejected,), "open"),
    Row("opening while paused is rejected", paused, OpenRound(), (Rejected,), "paused"),
    Row(
        "opening with too few ready clients is rejected",
        lambda: Sim().ready("c0"),
        OpenRound(),
        (Rejected,),
        "needs 2 ready clients, 1 are",
    ),
    Row("opening selects the ready clients", idle, OpenRound(), (OpenedRound,)),
    Row("closing with no open round is rejected", idle, CloseRound(), (Rejected,), "no round"),
    Row("closing below quorum is rejected", round_open, CloseRound(), (Rejected,), "0 of 2"),
    Row(
        "closing with quorum dispatches the aggregation",
        lambda: _then(round_open(), *_updates(1, "c0", "c1")),
        CloseRound(),
        (RoundClosed, DispatchAggregate),
    ),
    Row(
        "aggregation success moves to evaluation",
        aggregating,
        AggregationSucceeded(1, 1),
        (DispatchEvaluate,),
    ),
    Row(
        "aggregation success for a round not aggregating is ignored",
        round_open,
        AggregationSucceeded(1, 1),
        (Ignored,),
        "round 1 is not aggregating",
    ),
    Row(
        "aggregation success arriving twice is ignored",
        evaluating,
        AggregationSucceeded(1, 1),
        (Ignored,),
        "stale",
    ),
    Row(
        "aggregation success for another round is ignored",
        aggregating,
        AggregationSucceeded(7, 1),
        (Ignored,),
        "round 7",
    ),
    Row(
        "aggregation success with an old model version is rejected",
        aggregating,
        AggregationSucceeded(1, 0),
        (Rejected,),
        "model version",
    ),
    Row(
        "aggregation failure after the round moved on is ignored",
        done,
        AggregationFailed(1, "boom", True),
        (Ignored,),
    ),
    Row("evaluation finishes the round", evaluating, EvaluationFinished(1, {}), (RoundDone,)),
    Row("evaluation arriving twice is ignored", done, EvaluationFinished(1, {}), (Ignored,)),
    Row("autorun of zero rounds is rejected", idle, Autorun(0), (Rejected,), "at least one"),
    Row("stopping an autorun not running is ignored", idle, StopAutorun(), (Ignored,)),
    Row("pausing twice is ignored", paused, Pause(), (Ignored,), "already paused"),
    Row("resuming when not paused is ignored", idle, Resume(), (Ignored,)),
    Row("resuming a paused run", paused, Resume(), (PauseChanged,)),
    Row("an unknown event is rejected", idle, object(), (Rejected,), "unknown event"),  # type: ignore[arg-type]
]


CLIENT_EFFECTS = (ClientStateChanged, ClientWentOffline)


@pytest.mark.parametrize("row", TABLE, ids=[r.name.replace(" ", "_") for r in TABLE])
def test_transition_table(row: Row) -> None:
    """``then`` lists the effects in order; client state changes are checked only if listed."""
    sim = row.given()
    before = sim.fed
    effects = sim(row.when)
    round_effects = [type(e) for e in effects if not isinstance(e, CLIENT_EFFECTS)]
    assert round_effects == [t for t in row.then if t not in CLIENT_EFFECTS], effects
    for kind in set(row.then) & set(CLIENT_EFFECTS):
        assert of(kind, effects), effects
    if row.reason:
        assert row.reason in effects[0].reason  # type: ignore[attr-defined]
    if row.then and row.then[0] in (Rejected, Ignored):
        assert sim.fed is before, "a refused event must leave the state exactly as it was"


# --- every (client state, signalled state) pair -------------------------------------------

BUILD_CLIENT_IN: dict[ClientState, Callable[[], Sim]] = {
    ClientState.JOIN: lambda: _then(idle(), ClientJoined("cx")),
    ClientState.READY: lambda: idle().ready("cx"),
    ClientState.TRAINING: lambda: _then(idle().ready("cx"), OpenRound()),
    ClientState.UPDATE: lambda: _then(idle().ready("cx"), OpenRound(), *_updates(1, "cx")),
    ClientState.FINISH: lambda: _then(
        idle().ready("cx"), OpenRound(), *_updates(1, "c0", "c1", "c2", "cx")
    ),
    ClientState.OFFLINE: lambda: _then(idle().ready("cx"), ClientLeft("cx")),
}
PAIRS = [(a, b) for a in ClientState for b in ClientState]


@pytest.mark.parametrize(
    ("current", "signalled"), PAIRS, ids=[f"{a}_signals_{b}" for a, b in PAIRS]
)
def test_signal_rules_cover_every_pair(current: ClientState, signalled: ClientState) -> None:
    sim = BUILD_CLIENT_IN[current]()
    assert sim.state("cx") is current
    before = sim.fed
    effects = sim(ClientSignal("cx", signalled))
    rule = SIGNAL_RULES.get((current, signalled))
    if rule is None:
        assert [type(e) for e in effects] == [Rejected]
    elif rule == "duplicate":
        assert [type(e) for e in effects] == [Ignored]
    else:
        assert not of(Rejected, effects) and not of(Ignored, effects)
        want = {
            "ready": ClientState.READY,
            "leave": ClientState.OFFLINE,
            "rejoin": ClientState.JOIN,
        }
        assert sim.state("cx") is want.get(rule, current)
        assert sim.fed.clients["cx"].last_seen == sim.now
    if rule in (None, "duplicate"):
        assert sim.fed is before


# --- the paper's scenes ---------------------------------------------------------------------


def test_dropout_client_3_leaves_mid_round_and_the_round_completes_with_the_other_4() -> None:
    sim = Sim(RoundPolicy(min_clients=3)).ready(*names(5))
    sim(OpenRound())
    assert sim.fed.round is not None and sim.fed.round.selected == tuple(names(5))
    assert sim.fed.active_clients == 5
    sim.report("client_1", "client_2")

    out = sim(ClientLeft("client_3"))
    assert of(ClientWentOffline, out) == [
        ClientWentOffline("client_3", ClientState.TRAINING, "left")
    ]
    assert sim.fed.active_clients == 4
    assert sim.fed.round.dropped == ("client_3",)
    assert sim.fed.round.state is RoundState.OPEN

    out = sim.report("client_4", "client_5")
    [agg] = of(DispatchAggregate, out)
    assert [u.client_id for u in agg.updates] == ["client_1", "client_2", "client_4", "client_5"]
    sim(AggregationSucceeded(1, 1), EvaluationFinished(1, {"accuracy": 0.9}))
    assert sim.fed.round.state is RoundState.DONE
    assert sim.fed.last_completed_round == 1 and sim.fed.model_version == 1


def test_a_client_that_leaves_after_reporting_keeps_its_update_counted() -> None:
    sim = Sim(RoundPolicy(min_clients=3)).ready(*names(5))
    sim(OpenRound())
    sim.report("client_3")
    sim(ClientLeft("client_3"))
    out = sim.report("client_1", "client_2", "client_4", "client_5")
    [agg] = of(DispatchAggregate, out)
    assert sorted(u.client_id for u in agg.updates) == names(5)
    assert sim.state("client_3") is ClientState.OFFLINE


def test_the_last_expected_client_leaving_closes_the_round_right_away() -> None:
    sim = Sim(RoundPolicy(min_clients=3)).ready(*names(4))
    sim(OpenRound())
    sim.report("client_1", "client_2", "client_3")
    out = sim(ClientKicked("client_4"))
    [closed] = of(RoundClosed, out)
    assert closed.received == 3 and sim.fed.round is not None
    assert sim.fed.round.state is RoundState.AGGREGATING


def test_late_join_waits_for_the_next_round_and_is_selected_then() -> None:
    sim = Sim(RoundPolicy(min_clients=3)).ready(*names(4))
    sim(Autorun(2))
    assert sim.fed.round is not None and sim.fed.round.selected == tuple(names(4))
    assert sim.fed.active_clients == 4

    out = sim.join_ready("client_5")
    assert not of(OpenedRound, out)
    assert sim.fed.active_clients == 5
    assert sim.fed.clients["client_5"].eligible_from == 2
    assert "client_5" not in sim.fed.round.selected
    rejected = sim(UpdateReceived("client_5", 1, "x", 1))
    assert [type(e) for e in rejected] == [Rejected]

    out = sim.finish_round()
    [opened] = of(OpenedRound, out)
    assert opened.number == 2 and opened.selected == tuple(names(5))
    assert sim.state("client_5") is ClientState.TRAINING


def test_a_client_joining_during_an_attempt_waits_out_that_rounds_retries_too() -> None:
    sim = Sim(RoundPolicy(min_clients=2, quorum_count=2, heartbeat_timeout_s=1e9)).ready("a", "b")
    sim(OpenRound())
    sim.report("a")
    sim.join_ready("late")
    out = sim.advance(POLICY.deadline_s * 3)  # attempt 1 ends with 1 of 2 updates
    [opened] = of(OpenedRound, out)
    assert (opened.number, opened.attempt, opened.selected) == (1, 2, ("a", "b"))
    assert sim.state("late") is ClientState.READY


def test_silent_client_goes_offline_and_the_round_closes_at_the_deadline_with_quorum() -> None:
    sim = Sim(RoundPolicy(min_clients=3, deadline_s=100, heartbeat_timeout_s=30)).ready(*names(5))
    sim(OpenRound())
    assert sim.fed.round is not None and sim.fed.round.quorum == 3
    sim.report("client_1", "client_2", "client_3")
    offline_at: float | None = None
    for _ in range(10):  # client_5 never speaks again; client_4 is alive but never reports
        sim.now += 10
        sim(*(Heartbeat(c) for c in names(4)))
        out = sim(Tick())
        if of(ClientWentOffline, out):
            offline_at = sim.now - T0
            assert of(ClientWentOffline, out) == [
                ClientWentOffline("client_5", ClientState.TRAINING, "timeout")
            ]
            assert sim.fed.round.dropped == ("client_5",)
            assert sim.fed.round.state is RoundState.OPEN
    assert offline_at == 40
    [closed] = of(RoundClosed, sim.log)
    assert closed.reason == "deadline" and closed.received == 3
    assert sim.state("client_4") is ClientState.READY
    assert sim.state("client_1") is ClientState.FINISH


def test_below_quorum_at_the_deadline_fails_and_a_fresh_attempt_keeps_received_updates() -> None:
    sim = Sim(RoundPolicy(min_clients=2, quorum_fraction=0.75, heartbeat_timeout_s=1e9))
    sim.ready(*names(4))
    sim(Autorun(1))
    sim.report("client_1")
    out = sim.advance(POLICY.deadline_s * 3)
    assert [type(e) for e in out if not isinstance(e, CLIENT_EFFECTS)] == [
        RoundFailed,
        RoundRetried,
        OpenedRound,
    ]
    assert of(RoundFailed, out)[0].final is False
    [opened] = of(OpenedRound, out)
    assert (opened.number, opened.attempt, opened.carried) == (1, 2, ("client_1",))
    assert sim.state("client_1") is ClientState.UPDATE
    assert sim.state("client_2") is ClientState.TRAINING

    sim.report("client_2", "client_3")
    out = sim.advance(POLICY.deadline_s * 3)
    [agg] = of(DispatchAggregate, out)
    assert (agg.round, agg.attempt) == (1, 2)
    assert [u.client_id for u in agg.updates] == ["client_1", "client_2", "client_3"]
    assert agg.updates[0] == Update("client_1", "client_1@1", 10)


def test_a_round_failing_every_attempt_fails_for_good_and_stops_autorun() -> None:
    sim = Sim().ready(*names(3))
    sim(Autorun(5))
    out = sim.later(POLICY.deadline_s, *names(3))  # attempt 1 ends empty, attempt 2 opens
    assert [(e.number, e.attempt) for e in of(OpenedRound, out)] == [(1, 2)]
    out = sim.later(POLICY.deadline_s, *names(3))
    [failed] = of(RoundFailed, out)
    assert failed.final and failed.attempt == POLICY.max_attempts
    assert of(AutorunChanged, out) == [AutorunChanged(None, "round 1 failed")]
    assert not of(OpenedRound, out)
    assert sim.fed.round is not None and sim.fed.round.state is RoundState.FAILED
    assert all(sim.state(c) is ClientState.READY for c in names(3))
    [opened] = of(OpenedRound, sim(OpenRound()))
    assert (opened.number, opened.attempt) == (2, 1)


def test_a_retry_waits_for_a_fresh_ready_client_and_stop_autorun_gives_it_up() -> None:
    sim = Sim(RoundPolicy(min_clients=2, heartbeat_timeout_s=30, max_attempts=2)).ready("a", "b")
    sim(Autorun(2))
    out = sim.advance(31)  # both go silent: nobody is left to wait for
    [failed] = of(RoundFailed, out)
    assert not failed.final and sim.fed.retry_pending
    assert [type(e) for e in sim(OpenRound())] == [Rejected]
    out = sim.join_ready("a")
    assert not of(OpenedRound, out)  # one fresh client, but min_clients is 2
    out = sim.join_ready("b")
    assert [(e.number, e.attempt) for e in of(OpenedRound, out)] == [(1, 2)]

    sim.advance(31)  # silent again: attempt 2 fails and it was the last one
    assert sim.fed.round is not None and sim.fed.round.state is RoundState.FAILED
    assert not sim.fed.retry_pending and sim.fed.autorun_remaining is None

    sim2 = Sim(RoundPolicy(min_clients=2, heartbeat_timeout_s=30, max_attempts=3)).ready("a", "b")
    sim2(OpenRound())
    sim2.advance(31)
    assert sim2.fed.retry_pending
    out = sim2(StopAutorun())
    assert [(e.final, e.reason) for e in of(RoundFailed, out)] == [
        (True, "retry given up: stopped by operator")
    ]
    assert not of(OpenedRound, sim2.join_ready("a", "b")) and not sim2.fed.retry_pending


def test_autorun_3_from_idle_runs_exactly_3_rounds() -> None:
    sim = Sim().ready(*names(4))
    sim(Autorun(3))
    for _ in range(6):
        if sim.fed.round is not None and sim.fed.round.state is RoundState.OPEN:
            sim.finish_round()
    assert [e.number for e in of(OpenedRound, sim.log)] == [1, 2, 3]
    assert [e.number for e in of(RoundDone, sim.log)] == [1, 2, 3]
    assert sim.fed.autorun_remaining == 0 and sim.fed.last_completed_round == 3
    assert sim.fed.model_version == 3
    assert all(sim.state(c) is ClientState.FINISH for c in names(4))


def test_autorun_waits_for_enough_ready_clients_then_opens() -> None:
    sim = Sim().ready("c0")
    assert not of(OpenedRound, sim(Autorun(1)))
    assert not of(OpenedRound, sim.advance(1))
    [opened] = of(OpenedRound, sim.join_ready("c1"))
    assert opened.selected == ("c0", "c1")


def test_stop_autorun_mid_round_stops_after_the_current_round() -> None:
    sim = Sim().ready(*names(3))
    sim(Autorun(5))
    assert of(AutorunChanged, sim(StopAutorun())) == [AutorunChanged(None, "stopped by operator")]
    assert sim.fed.round is not None and sim.fed.round.state is RoundState.OPEN
    out = sim.finish_round()
    assert of(RoundDone, out) and not of(OpenedRound, out)
    assert sim.fed.round.number == 1 and sim.fed.autorun_remaining is None


def test_pause_lets_the_open_round_finish_and_resume_continues_autorun() -> None:
    sim = Sim().ready(*names(3))
    sim(Autorun(2))
    sim(Pause())
    out = sim.finish_round()
    assert of(RoundDone, out) and not of(OpenedRound, out)
    assert sim.fed.autorun_remaining == 1
    [opened] = of(OpenedRound, sim(Resume()))
    assert opened.number == 2


def test_a_duplicate_update_is_ignored_and_counted_once() -> None:
    sim = Sim().ready(*names(3))
    sim(OpenRound())
    sim.report("client_1")
    before = sim.fed
    out = sim(UpdateReceived("client_1", 1, "client_1@1", 10))
    assert [type(e) for e in out] == [Ignored] and sim.fed is before
    [agg] = of(DispatchAggregate, sim.report("client_2", "client_3"))
    assert [u.client_id for u in agg.updates] == names(3)


def test_an_update_for_a_closed_round_is_rejected_with_its_reason() -> None:
    sim = Sim().ready(*names(3))
    sim(OpenRound())
    sim.finish_round()
    out = sim(UpdateReceived("client_1", 3, "late", 10))
    assert out == [Rejected(UpdateReceived("client_1", 3, "late", 10), "round 3 is not open")]


def test_sampled_selection_is_deterministic_in_run_round_and_attempt() -> None:
    policy = RoundPolicy(min_clients=3, fraction=0.3)
    ids = [f"c{i:02}" for i in range(20)]
    first = select_clients("run-1", 4, 1, ids, 0, policy)
    assert first == select_clients("run-1", 4, 1, reversed(ids), 0, policy)
    assert len(first) == 6 and list(first) == sorted(first)
    draws = {select_clients("run-1", 4, a, ids, 0, policy) for a in range(1, 6)}
    draws |= {select_clients("run-2", 4, 1, ids, 0, policy)}
    assert len(draws) > 1
    assert len(select_clients("run-1", 1, 1, ids, 0, RoundPolicy(min_clients=3, fraction=0.1))) == 3


def test_a_restored_orchestrator_selects_the_same_clients() -> None:
    policy = RoundPolicy(min_clients=2, fraction=0.4)
    original, restored = Sim(policy).ready(*names(10)), Sim(policy).ready(*names(10))
    restored.fed = from_dict(to_dict(restored.fed))
    a, b = original(Autorun(3)), restored(Autorun(3))
    assert a == b and len(of(OpenedRound, a)[0].selected) == 4
    a, b = original.finish_round(), restored.finish_round()
    assert of(OpenedRound, a) == of(OpenedRound, b) and original.fed == restored.fed


def test_aggregation_is_retried_then_the_round_fails() -> None:
    sim = Sim().ready(*names(3))
    sim(Autorun(2))
    [first] = of(DispatchAggregate, sim.report(*names(3)))
    out = sim(AggregationFailed(1, "worker lost", retryable=True))
    assert out == [DispatchAggregate(1, 1, first.updates, 0, retry=1)]
    out = sim(AggregationFailed(1, "worker lost", retryable=True))
    assert of(RoundFailed, out) == [RoundFailed(1, 1, "aggregation failed: worker lost", True)]
    assert of(AutorunChanged, out) == [AutorunChanged(None, "round 1 failed")]
    assert not of(OpenedRound, out)
    assert [type(e) for e in sim(AggregationFailed(1, "worker lost", True))] == [Ignored]


def test_a_non_retryable_aggregation_failure_fails_the_round_at_once() -> None:
    sim = aggregating()
    out = sim(AggregationFailed(1, "bad update", retryable=False))
    assert [e.final for e in of(RoundFailed, out)] == [True]


# --- contracts with the rest of the system --------------------------------------------------


def test_step_never_modifies_its_input() -> None:
    sim = half_reported()
    snapshot = to_dict(sim.fed)
    fed = sim.fed
    for event in (ClientLeft("c1"), Tick(), UpdateReceived("c2", 1, "r", 1), CloseRound()):
        step(fed, event, T0 + 1e6)
        assert to_dict(fed) == snapshot


def test_state_round_trips_through_plain_dicts() -> None:
    sim = Sim(RoundPolicy(min_clients=2, quorum_count=2)).ready(*names(4))
    sim(Autorun(2))
    sim.finish_round()
    sim.report("client_1")
    sim(ClientKicked("client_2"))
    data = to_dict(sim.fed)
    assert from_dict(data) == sim.fed
    import json

    assert from_dict(json.loads(json.dumps(data))) == sim.fed


def test_every_effect_is_recordable_as_a_wire_event() -> None:
    sim = Sim().ready(*names(3))
    sim(Autorun(2), Pause(), Resume(), ClientReady("nobody"))
    sim.finish_round()
    sim(AggregationFailed(2, "x", False))
    sim(AggregationFailed(2, "x", False))
    kinds = {e.kind for e in sim.log}
    assert {"round.opened", "task.aggregate", "round.done", "rejected", "client.state"} <= kinds
    for effect in sim.log:
        Event(run_id="run-1", kind=effect.kind, detail=effect.detail())


def test_every_command_action_maps_to_an_event() -> None:
    events = {
        action: command_event(action, rounds=2, target_client="c0") for action in CommandAction
    }
    assert events[CommandAction.AUTORUN] == Autorun(2)
    assert events[CommandAction.KICK] == ClientKicked("c0")
    assert len({type(e) for e in events.values()}) == len(CommandAction)
    with pytest.raises(ValueError):
        command_event(CommandAction.AUTORUN)


@pytest.mark.parametrize(
    ("fraction", "selected", "need"), [(0.6, 5, 3), (0.5, 5, 3), (1.0, 4, 4), (0.01, 3, 1)]
)
def test_quorum_is_a_rounded_up_share_of_the_selected(
    fraction: float, selected: int, need: int
) -> None:
    assert RoundPolicy(quorum_fraction=fraction).quorum_for(selected) == need


def test_quorum_count_is_capped_by_the_selection() -> None:
    assert RoundPolicy(quorum_count=4).quorum_for(3) == 3


def test_a_policy_that_makes_no_sense_is_refused() -> None:
    with pytest.raises(ValueError, match="min_clients"):
        RoundPolicy(min_clients=0)
    with pytest.raises(ValueError, match="fraction"):
        RoundPolicy(fraction=0)


def test_a_heartbeat_refreshes_last_seen_only_once_it_is_a_quarter_timeout_old() -> None:
    sim = Sim(RoundPolicy(heartbeat_timeout_s=40)).ready("c0")
    joined = sim.fed.clients["c0"].last_seen
    sim.now += 9.9  # under 40 / 4: nothing changes, so the service writes nothing
    before = sim.fed
    assert sim(Heartbeat("c0")) == [] and sim.fed == before
    sim.now += 0.1  # 10 s old now: refreshed
    sim(Heartbeat("c0"))
    assert sim.fed.clients["c0"].last_seen == sim.now != joined
    # A client heartbeating every 9 s is never written off, however long it runs.
    for _ in range(20):
        sim.now += 9
        sim(Heartbeat("c0"))
        assert not of(ClientWentOffline, sim(Tick()))
    assert sim.state("c0") is ClientState.READY
