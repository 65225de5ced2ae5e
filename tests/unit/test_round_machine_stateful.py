"""Random event sequences never break the round machine's invariants or lose an update."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestrator.state import (
    AggregationFailed,
    AggregationSucceeded,
    Autorun,
    ClientJoined,
    ClientKicked,
    ClientLeft,
    ClientReady,
    ClientSignal,
    CloseRound,
    DispatchAggregate,
    EvaluationFinished,
    Federation,
    Heartbeat,
    Ignored,
    Input,
    OpenedRound,
    OpenRound,
    Pause,
    Rejected,
    Resume,
    RoundFailed,
    RoundPolicy,
    StopAutorun,
    Tick,
    Update,
    UpdateAccepted,
    UpdateReceived,
    from_dict,
    step,
    to_dict,
)
from protocol.messages import ClientState, RoundState

CLIENTS = [f"c{i}" for i in range(6)]
# "ghost" never joins unless a rule makes it: events from unknown clients stay in the mix.
client_ids = st.sampled_from([*CLIENTS, "ghost"])
round_offsets = st.sampled_from([0, 0, 0, -1, 1])

client_events = st.one_of(
    *(st.builds(make, client_ids) for make in (ClientJoined, ClientReady, Heartbeat)),
    *(st.builds(make, client_ids) for make in (ClientLeft, ClientKicked)),
    st.builds(ClientSignal, client_ids, st.sampled_from(list(ClientState))),
)


@st.composite
def policies(draw: st.DrawFn) -> RoundPolicy:
    min_clients = draw(st.integers(1, 3))
    return RoundPolicy(
        min_clients=min_clients,
        fraction=draw(st.sampled_from([1.0, 0.5])),
        quorum_fraction=draw(st.sampled_from([0.5, 1.0])),
        quorum_count=draw(st.sampled_from([None, None, 2])),
        deadline_s=100.0,
        heartbeat_timeout_s=draw(st.sampled_from([30.0, 1000.0])),
        max_attempts=draw(st.integers(1, 3)),
        max_aggregation_retries=draw(st.integers(0, 2)),
        # A cap at min_clients or one above it: below the fleet, so that it bites.
        max_clients=draw(st.sampled_from([None, min_clients, min_clients + 1])),
        selection=draw(st.sampled_from(["uniform", "availability"])),
    )


class RoundMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fed = Federation("run-s")
        self.now = 0.0
        self.counter = 0
        # The test's own record of what the machine accepted, to catch a lost update.
        self.accepted: dict[int, list[Update]] = {}
        self.dispatched: dict[int, tuple[Update, ...]] = {}
        self.delivered: list[Input] = []
        self.failed: set[int] = set()

    @initialize(
        policy=policies(),
        ready=st.lists(st.sampled_from(CLIENTS), unique=True, max_size=len(CLIENTS)),
        autorun=st.sampled_from([None, 1, 3]),
    )
    def start(self, policy: RoundPolicy, ready: list[str], autorun: int | None) -> None:
        # Starting with ready clients (and maybe autorun) gets the 50 steps to deep states:
        # rounds that close, aggregate, retry and fail, not only refusals of an empty run.
        self.fed = Federation("run-s", policy)
        for c in CLIENTS:
            self.apply(ClientJoined(c))
        for c in ready:
            self.apply(ClientReady(c))
        if autorun is not None:
            self.apply(Autorun(autorun))

    # --- feeding events ---------------------------------------------------------------------

    def apply(self, event: Input) -> None:
        before = self.fed
        snapshot = to_dict(before)
        after, effects = step(before, event, self.now)
        assert step(before, event, self.now) == (after, effects), "step must be deterministic"
        assert to_dict(before) == snapshot, "step must not modify its input"
        if any(isinstance(e, Rejected | Ignored) for e in effects):
            assert len(effects) == 1 and after is before
        for effect in effects:
            self.track(effect)
        self.fed = after

    def track(self, effect: object) -> None:
        if isinstance(effect, UpdateAccepted):
            got = self.accepted.setdefault(effect.round, [])
            assert effect.client_id not in {u.client_id for u in got}
            got.append(Update(effect.client_id, effect.ref, effect.num_samples))
        elif isinstance(effect, OpenedRound):
            got = self.accepted.get(effect.number, [])
            if effect.attempt == 1:
                assert not got and effect.number not in self.dispatched
            assert set(effect.carried) == {u.client_id for u in got}
        elif isinstance(effect, DispatchAggregate):
            want = self.accepted.get(effect.round, [])
            assert Counter(effect.updates) == Counter(want), "an accepted update went missing"
            assert len({u.client_id for u in effect.updates}) == len(effect.updates)
            if effect.round in self.dispatched:
                assert self.dispatched[effect.round] == effect.updates
            self.dispatched[effect.round] = effect.updates
        elif isinstance(effect, RoundFailed) and effect.final:
            self.failed.add(effect.number)

    def current(self) -> int:
        return self.fed.round.number if self.fed.round is not None else 1

    # --- clients ----------------------------------------------------------------------------

    @rule(event=client_events)
    def client_event(self, event: Input) -> None:
        self.apply(event)

    @rule(c=client_ids)
    def join_and_ready(self, c: str) -> None:
        self.apply(ClientJoined(c))
        self.apply(ClientReady(c))

    def send(self, event: Input) -> None:
        self.delivered.append(event)
        self.apply(event)

    @rule(c=client_ids, offset=round_offsets, n=st.integers(0, 50))
    def update(self, c: str, offset: int, n: int) -> None:
        self.counter += 1
        number = self.current() + offset
        self.send(UpdateReceived(c, number, f"{c}-{number}-{self.counter}", n))

    @precondition(lambda self: self.fed.round is not None and self.fed.round.expected)
    @rule(i=st.integers(0, 5), n=st.integers(1, 50))
    def update_from_expected(self, i: int, n: int) -> None:
        rnd = self.fed.round
        assert rnd is not None
        c = rnd.expected[i % len(rnd.expected)]
        self.counter += 1
        self.send(UpdateReceived(c, rnd.number, f"{c}-{rnd.number}-{self.counter}", n))

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The bus delivers an update or a task outcome again."""
        self.apply(data.draw(st.sampled_from(self.delivered)))

    # --- time -------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 1.0, 10.0, 29.0, 31.0, 60.0, 120.0]), alive=st.booleans())
    def tick(self, dt: float, alive: bool) -> None:
        self.now += dt
        if alive:
            for c, record in sorted(self.fed.clients.items()):
                if record.state is not ClientState.OFFLINE:
                    self.apply(Heartbeat(c))
        self.apply(Tick())

    # --- commands ---------------------------------------------------------------------------

    @rule(
        command=st.sampled_from(
            [
                *(Autorun(1), Autorun(3), Autorun(0), StopAutorun()),
                *(OpenRound(), CloseRound(), Pause(), Resume()),
            ]
        )
    )
    def command(self, command: Input) -> None:
        self.apply(command)

    # --- task outcomes ----------------------------------------------------------------------

    @rule(
        kind=st.sampled_from(["aggregated", "failed", "evaluated"]),
        offset=round_offsets,
        flag=st.booleans(),
    )
    def any_outcome(self, kind: str, offset: int, flag: bool) -> None:
        """A task outcome that may be stale, for another round, or carry an old version."""
        number = self.current() + offset
        if kind == "aggregated":
            self.send(AggregationSucceeded(number, self.fed.model_version + int(flag)))
        elif kind == "failed":
            self.send(AggregationFailed(number, "boom", retryable=flag))
        else:
            self.send(EvaluationFinished(number, {"accuracy": 0.5}))

    @precondition(
        lambda self: (
            self.fed.round is not None
            and self.fed.round.state in (RoundState.AGGREGATING, RoundState.EVALUATING)
        )
    )
    @rule(ok=st.booleans())
    def task_reports_back(self, ok: bool) -> None:
        """The outcome the current task would send; random outcomes alone rarely fit."""
        rnd = self.fed.round
        assert rnd is not None
        if rnd.state is RoundState.EVALUATING:
            self.send(EvaluationFinished(rnd.number, {"accuracy": 0.5}))
        elif ok:
            self.send(AggregationSucceeded(rnd.number, self.fed.model_version + 1))
        else:
            self.send(AggregationFailed(rnd.number, "worker lost", retryable=True))

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def state_is_valid(self) -> None:
        fed = self.fed
        assert fed.autorun_remaining is None or fed.autorun_remaining >= 0
        for cid, record in fed.clients.items():
            assert record.client_id == cid and record.state in ClientState
            assert 0.0 <= record.availability <= 1.0
            assert (record.state is ClientState.OFFLINE) == (record.offline_reason is not None)
        rnd = fed.round
        if rnd is None:
            assert not any(c.state is ClientState.TRAINING for c in fed.clients.values())
            return
        assert rnd.state in RoundState
        selected, received = set(rnd.selected), rnd.received_clients
        assert selected and selected <= set(fed.clients)
        assert len(selected) >= fed.policy.min_clients
        assert fed.policy.max_clients is None or len(selected) <= fed.policy.max_clients
        assert received <= selected and len(received) == len(rnd.received)
        assert set(rnd.dropped) <= selected and not set(rnd.dropped) & set(rnd.expected)
        assert 1 <= rnd.quorum <= len(selected)
        if rnd.state in (RoundState.AGGREGATING, RoundState.EVALUATING, RoundState.DONE):
            assert rnd.has_quorum
        if rnd.state in (RoundState.EVALUATING, RoundState.DONE):
            assert rnd.model_version is not None and rnd.model_version <= fed.model_version
        if rnd.retry_pending:
            assert rnd.state is RoundState.FAILED and rnd.attempt < fed.policy.max_attempts
        assert fed.last_completed_round <= rnd.number

        training = {c for c, r in fed.clients.items() if r.state is ClientState.TRAINING}
        expected = set(rnd.expected) if rnd.state is RoundState.OPEN else set()
        assert training == expected, "training means selected, expected and not yet reported"
        for c in expected:  # a late joiner is never in the round it joined during
            assert fed.clients[c].eligible_from <= rnd.number
        updating = {c for c, r in fed.clients.items() if r.state is ClientState.UPDATE}
        assert updating <= received
        if updating:
            assert rnd.state is RoundState.OPEN or rnd.retry_pending

    @invariant()
    def state_survives_a_restart(self) -> None:
        assert from_dict(to_dict(self.fed)) == self.fed

    @invariant()
    def a_dispatched_round_holds_every_accepted_update(self) -> None:
        rnd = self.fed.round
        if rnd is not None and rnd.state is not RoundState.OPEN and rnd.number in self.dispatched:
            assert Counter(self.dispatched[rnd.number]) == Counter(rnd.received)
        if rnd is not None:
            assert Counter(rnd.received) == Counter(self.accepted.get(rnd.number, []))

    @invariant()
    def no_accepted_update_is_unaccounted_for(self) -> None:
        """Accepted updates get aggregated, or wait in their round, or their round failed."""
        rnd = self.fed.round
        for number, got in self.accepted.items():
            waiting = (
                rnd is not None
                and rnd.number == number
                and (rnd.state is RoundState.OPEN or rnd.retry_pending)
            )
            assert not got or number in self.dispatched or number in self.failed or waiting


TestRoundMachine = RoundMachine.TestCase
TestRoundMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
