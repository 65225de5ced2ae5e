"""Cross-device sampling: a cap per round, uniform or availability-weighted draws, and the
availability each client record keeps (issue 16, item 6). Pure logic, no services.

The statistical tests draw with fixed run ids and round numbers: the draw is a hash of
them, so each test sees the same numbers on every run and cannot flake; the bounds are
wide (several standard deviations) so that they test the sampler, not the seed.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.state import (
    AggregationSucceeded,
    Autorun,
    ClientKicked,
    ClientRecord,
    EvaluationFinished,
    Federation,
    OpenedRound,
    RoundPolicy,
    from_dict,
    select_clients,
    step,
    to_dict,
)
from orchestrator.state.policy import AVAILABILITY_DECAY, AVAILABILITY_PRIOR, observe
from orchestrator.state.serde import client_from_dict, client_to_dict
from protocol.messages import ClientState, RoundState
from tests.unit.test_round_machine import Sim, names, of

IDS = [f"d{i:04}" for i in range(60)]


# --- how many ------------------------------------------------------------------------------


@given(
    eligible=st.integers(0, 3000),
    carried=st.integers(0, 50),
    min_clients=st.integers(1, 100),
    fraction=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    extra=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_sample_size_is_capped_and_keeps_min_clients(
    eligible: int, carried: int, min_clients: int, fraction: float, extra: int | None
) -> None:
    cap = None if extra is None else min_clients + extra
    policy = RoundPolicy(min_clients=min_clients, fraction=fraction, max_clients=cap)
    size = policy.sample_size(eligible, carried)
    uncapped = RoundPolicy(min_clients=min_clients, fraction=fraction).sample_size(
        eligible, carried
    )
    if cap is None:
        assert size == uncapped
    else:
        assert size == min(uncapped, max(cap - carried, 1))
    assert 0 <= size <= eligible and (size > 0) == (eligible > 0)
    if cap is not None and carried < cap:
        assert carried + size <= cap
    # The cap never takes a round under min_clients when enough clients are there.
    assert size >= min(eligible, min_clients - carried)


@given(
    pool=st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)),
    cap=st.integers(1, 30),
    selection=st.sampled_from(["uniform", "availability"]),
    round_number=st.integers(1, 50),
    weights=st.lists(st.floats(0.0, 1.0), min_size=len(IDS), max_size=len(IDS)),
)
def test_a_draw_takes_exactly_the_cap_from_the_pool_and_is_the_same_in_any_order(
    pool: list[str], cap: int, selection: str, round_number: int, weights: list[float]
) -> None:
    policy = RoundPolicy(max_clients=cap, selection=selection)  # type: ignore[arg-type]
    avail = dict(zip(IDS, weights, strict=True))
    drawn = select_clients("run-x", round_number, 1, pool, 0, policy, avail)
    assert len(drawn) == min(cap, len(pool)) and set(drawn) <= set(pool)
    assert list(drawn) == sorted(set(drawn))
    again = select_clients("run-x", round_number, 1, reversed(pool), 0, policy, dict(avail))
    assert again == drawn


def test_different_rounds_runs_and_attempts_draw_differently() -> None:
    for selection in ("uniform", "availability"):
        policy = RoundPolicy(max_clients=10, selection=selection)  # type: ignore[arg-type]
        draws = {select_clients("run-1", n, 1, IDS, 0, policy) for n in range(1, 6)}
        draws |= {select_clients("run-1", 1, a, IDS, 0, policy) for a in range(2, 4)}
        draws |= {select_clients("run-2", 1, 1, IDS, 0, policy)}
        assert len(draws) == 8


def test_uniform_with_a_cap_is_the_same_draw_as_before_the_cap_existed() -> None:
    """A cap only limits how many: the ranking is the one ``fraction`` always used."""
    by_fraction = select_clients("run-1", 3, 1, IDS, 0, RoundPolicy(fraction=0.25))
    by_cap = select_clients("run-1", 3, 1, IDS, 0, RoundPolicy(max_clients=15))
    assert by_fraction == by_cap and len(by_cap) == 15


# --- whom ----------------------------------------------------------------------------------

STATES = [*ClientState]


@given(
    states=st.lists(st.sampled_from(STATES), min_size=1, max_size=40),
    late=st.sets(st.integers(0, 39)),
    cap=st.integers(1, 10),
    selection=st.sampled_from(["uniform", "availability"]),
)
def test_a_round_never_selects_an_offline_busy_or_late_client(
    states: list[ClientState], late: set[int], cap: int, selection: str
) -> None:
    clients = {
        f"c{i}": ClientRecord(
            f"c{i}",
            state,
            0.0,
            0.0,
            eligible_from=2 if i in late else 1,
            offline_reason="left" if state is ClientState.OFFLINE else None,
            availability=(i % 5) / 4,
        )
        for i, state in enumerate(states)
    }
    policy = RoundPolicy(max_clients=cap, selection=selection)  # type: ignore[arg-type]
    fed, effects = step(Federation("run-s", policy, clients), Autorun(1), 10.0)
    selectable = {
        cid
        for cid, c in clients.items()
        if c.state in (ClientState.READY, ClientState.FINISH) and c.eligible_from <= 1
    }
    opened = of(OpenedRound, effects)
    if not selectable:
        assert not opened and fed.round is None
        return
    [o] = opened
    assert set(o.selected) <= selectable
    assert len(o.selected) == min(cap, len(selectable))
    assert all(fed.clients[c].state is ClientState.TRAINING for c in o.selected)


def test_uniform_draws_every_client_about_equally_often() -> None:
    """200 clients, 20 a round, 1,000 rounds: each is drawn Binomial(1000, 0.1) times
    (mean 100, sd 9.5); a chi-square over all 200 counts has 199 degrees of freedom (mean
    199, sd 20)."""
    pool = [f"dev-{i}" for i in range(200)]
    policy = RoundPolicy(max_clients=20)
    counts = Counter(
        c for n in range(1, 1001) for c in select_clients("run-u", n, 1, pool, 0, policy)
    )
    assert sum(counts.values()) == 20 * 1000
    assert min(counts[c] for c in pool) > 50 and max(counts.values()) < 150
    chi2 = sum((counts[c] - 100) ** 2 / 100 for c in pool)
    assert chi2 < 300


def test_availability_weighting_prefers_available_clients() -> None:
    """Half the clients at 1.0, half at 0.2: five times the weight. Drawing 20 of 200 without
    replacement gives the available half a bit under 5/6 of the places (~0.82)."""
    pool = [f"dev-{i}" for i in range(200)]
    avail = {c: 1.0 if i % 2 == 0 else 0.2 for i, c in enumerate(pool)}
    policy = RoundPolicy(max_clients=20, selection="availability")
    counts = Counter(
        c for n in range(1, 501) for c in select_clients("run-a", n, 1, pool, 0, policy, avail)
    )
    share = sum(counts[c] for c in pool if avail[c] == 1.0) / sum(counts.values())
    assert 0.75 < share < 0.9
    # The less available still get their turns: weighting, not exclusion.
    assert all(counts[c] > 0 for c in pool if avail[c] == 0.2)
    uniform = Counter(
        c for n in range(1, 501) for c in select_clients("run-a", n, 1, pool, 0, policy)
    )
    assert uniform != counts  # no weights given: every client at the prior


def test_one_of_two_is_drawn_in_proportion_to_its_weight() -> None:
    """The exponential race: P(a wins) = w_a / (w_a + w_b) = 0.8 here (2,000 draws: sd 0.009)."""
    policy = RoundPolicy(max_clients=1, selection="availability")
    avail = {"a": 1.0, "b": 0.25}
    wins = sum(
        select_clients("run-w", n, 1, ["a", "b"], 0, policy, avail) == ("a",)
        for n in range(1, 2001)
    )
    assert 0.76 < wins / 2000 < 0.84


def test_a_client_of_no_availability_is_still_drawn_at_the_floor() -> None:
    policy = RoundPolicy(max_clients=1, selection="availability")
    avail = {"a": 1.0, "b": 0.0}
    drawn = Counter(
        select_clients("run-f", n, 1, ["a", "b"], 0, policy, avail)[0] for n in range(1, 2001)
    )
    assert 0 < drawn["b"] < 250  # 0.05 / 1.05 of 2000 is ~95


# --- availability as the machine keeps it --------------------------------------------------


def test_availability_follows_what_each_selected_client_did() -> None:
    policy = RoundPolicy(min_clients=3, quorum_count=1, deadline_s=100, heartbeat_timeout_s=30)
    sim = Sim(policy).ready(*names(4))
    sim(Autorun(2))
    assert sim.fed.round is not None and len(sim.fed.round.selected) == 4
    sim.report("client_1", "client_2")
    sim.later(50, *names(4))  # client_3 stays training; client_4 goes silent below
    sim.later(50, *names(3))  # the deadline: closed with 2 of 4
    a = {c: r.availability for c, r in sim.fed.clients.items()}
    missed = (1 - AVAILABILITY_DECAY) * AVAILABILITY_PRIOR
    assert a["client_1"] == a["client_2"] == AVAILABILITY_PRIOR
    assert a["client_3"] == pytest.approx(missed)  # closed without its update
    assert a["client_4"] == pytest.approx(missed)  # dropped out while selected: once
    assert sim.state("client_4") is ClientState.OFFLINE


def test_leaving_or_timing_out_while_idle_counts_kicks_do_not_and_rejoining_keeps_it() -> None:
    sim = Sim(RoundPolicy(heartbeat_timeout_s=30)).ready("a", "b", "c")
    sim.later(31, "a")  # b and c time out while idle
    assert sim.fed.clients["b"].availability == pytest.approx(observe(1.0, False))
    sim(ClientKicked("a"))
    assert sim.fed.clients["a"].availability == AVAILABILITY_PRIOR
    before = sim.fed.clients["c"].availability
    sim.join_ready("c")
    assert sim.state("c") is ClientState.READY
    assert sim.fed.clients["c"].availability == before < AVAILABILITY_PRIOR


def test_an_available_client_wins_more_rounds_in_the_machine() -> None:
    """Ten clients, two a round, five of them never report: after a few rounds the ones that
    do are drawn far more often."""
    policy = RoundPolicy(
        min_clients=2,
        max_clients=2,
        quorum_count=1,
        selection="availability",
        deadline_s=10,
        max_attempts=1000,
    )
    sim = Sim(policy).ready(*names(10))
    flaky = set(names(10)[5:])
    sim(Autorun(1000))
    wins: Counter[str] = Counter()
    for _ in range(60):
        rnd = sim.fed.round
        assert rnd is not None and rnd.state is RoundState.OPEN and len(rnd.selected) == 2
        wins.update(rnd.selected)
        sim.report(*(c for c in rnd.selected if c not in flaky))
        # The deadline: closes on what came, or fails the attempt and draws again.
        sim.later(11, *names(10))
        if sim.fed.round is not None and sim.fed.round.state is RoundState.AGGREGATING:
            sim(AggregationSucceeded(rnd.number, sim.fed.model_version + 1))
            sim(EvaluationFinished(rnd.number, {"accuracy": 0.5}))
    reliable = sum(n for c, n in wins.items() if c not in flaky)
    assert reliable > 2 * sum(n for c, n in wins.items() if c in flaky)
    assert all(sim.fed.clients[c].availability < 0.5 for c in flaky if wins[c] >= 4)


# --- the rules themselves ------------------------------------------------------------------


def test_a_policy_that_makes_no_sense_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"max_clients \(2\) must be >= min_clients \(3\)"):
        RoundPolicy(min_clients=3, max_clients=2)
    with pytest.raises(ValueError, match="selection must be one of uniform, availability"):
        RoundPolicy(selection="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_clients must be a whole number"):
        RoundPolicy(max_clients=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown policy field.*max_client;"):
        RoundPolicy.from_dict({"max_client": 10})
    with pytest.raises(ValueError, match="a policy is an object of fields, not list"):
        RoundPolicy.from_dict([1])  # type: ignore[arg-type]


def test_the_policy_and_availability_round_trip_through_json_and_the_snapshot() -> None:
    policy = RoundPolicy.from_dict(
        json.loads('{"min_clients": 2, "max_clients": 1000, "selection": "availability"}')
    )
    assert policy == RoundPolicy(min_clients=2, max_clients=1000, selection="availability")
    sim = Sim(policy).ready(*names(5))
    sim(Autorun(1))
    sim.later(301, *names(5))  # the deadline, nobody reported: every availability fell
    data = json.loads(json.dumps(to_dict(sim.fed)))
    assert from_dict(data) == sim.fed
    assert data["policy"]["max_clients"] == 1000 and data["policy"]["selection"] == "availability"
    record = sim.fed.clients["client_1"]
    assert record.availability < AVAILABILITY_PRIOR
    # A client saved before availability was kept loads at the prior.
    old = client_to_dict(record)
    del old["availability"]
    assert client_from_dict(old).availability == AVAILABILITY_PRIOR
