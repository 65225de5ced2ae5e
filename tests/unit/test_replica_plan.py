"""The fair share of runs among replicas (``orchestrator.replicas.plan``), without a database:
replicas renewing in any order end with every run held once and between floor and ceil of
runs / replicas each, stay there, and hand over to a replica that joins or from one that
leaves."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.replicas import plan


def renew(me: str, runs: list[str], live: set[str], held: dict[str, str]) -> None:
    """One replica's renewal applied to ``held`` (what the database would do)."""
    p = plan(me, runs, live, {r: h for r, h in held.items() if h in live})
    for r in p.release:
        assert held[r] == me
        del held[r]
    for r in p.claim:
        assert held.get(r) not in live or held.get(r) == me
        held[r] = me


def balanced(runs: list[str], live: set[str], held: dict[str, str]) -> bool:
    lo, hi = len(runs) // len(live), -(-len(runs) // len(live))
    counts = [sum(1 for r in runs if held.get(r) == x) for x in live]
    return all(held.get(r) in live for r in runs) and all(lo <= c <= hi for c in counts)


def settle(runs: list[str], live: set[str], held: dict[str, str], rng: random.Random) -> int:
    """Renewals in random order until balanced; how many rounds (every replica once) it
    took."""
    for rounds in range(1, 20):
        order = sorted(live)
        rng.shuffle(order)
        for me in order:
            renew(me, runs, live, held)
        if balanced(runs, live, held):
            return rounds
    raise AssertionError(f"not balanced after 20 rounds: {held}")


def test_a_lone_replica_claims_every_run() -> None:
    runs = [f"run{i}" for i in range(5)]
    p = plan("a", runs, {"a"}, {})
    assert sorted(p.claim) == runs and p.release == [] and p.target == 5


def test_a_replica_that_joins_gets_its_share_from_the_one_holding_everything() -> None:
    runs = [f"run{i}" for i in range(4)]
    held = dict.fromkeys(runs, "a")
    # b sees nothing free: it claims nothing yet; a sees b short of its share and hands back.
    assert plan("b", runs, {"a", "b"}, held).claim == []
    p = plan("a", runs, {"a", "b"}, held)
    assert len(p.release) == 2
    for r in p.release:
        del held[r]
    # a does not take back what it handed back; b takes it.
    assert plan("a", runs, {"a", "b"}, held).claim == []
    assert sorted(plan("b", runs, {"a", "b"}, held).claim) == sorted(p.release)


def test_a_newcomer_is_not_starved_when_the_share_does_not_divide() -> None:
    # 4 runs, 3 replicas: 2/2/0 is within ceil(4/3) each but leaves c idle; floor is 1.
    runs = [f"run{i}" for i in range(4)]
    held = {"run0": "a", "run1": "a", "run2": "b", "run3": "b"}
    live = {"a", "b", "c"}
    assert len(plan("a", runs, live, held).release) == 1
    assert len(plan("b", runs, live, held).release) == 1
    settle(runs, live, held, random.Random(0))
    assert sorted(sum(1 for h in held.values() if h == x) for x in live) == [1, 1, 2]


def test_free_runs_nobody_took_for_a_renewal_are_claimed_beyond_the_share() -> None:
    # c is live but (say) stalled: the share says a and b stop at 1, yet an orphaned run
    # must not stay unticked for as long as c looks alive.
    runs = ["run0", "run1", "run2", "run3"]
    held = {"run0": "a", "run1": "b"}
    live = {"a", "b", "c"}
    held_c = {**held, "run2": "c"}
    assert plan("a", runs, live, held_c).claim == ["run3"]  # c at 1 = floor: a may go to 2
    held_short = dict(held)  # c holds nothing: a and b keep to the floor ...
    assert plan("a", runs, live, held_short).claim == []
    # ... unless the free runs were free at the previous renewal too.
    orphaned = plan("a", runs, live, held_short, orphans={"run2", "run3"})
    assert sorted(orphaned.claim) == ["run2", "run3"]


def test_a_balanced_spread_is_left_alone() -> None:
    runs = [f"run{i}" for i in range(7)]
    live = {"a", "b", "c"}
    held: dict[str, str] = {}
    settle(runs, live, held, random.Random(1))
    before = dict(held)
    for me in sorted(live):
        p = plan(me, runs, live, held)
        assert p.claim == [] and p.release == []
    assert held == before


@given(
    n_runs=st.integers(0, 12),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_order_of_renewals_converges_and_survives_joins_and_deaths(
    n_runs: int, replicas: int, seed: int
) -> None:
    rng = random.Random(seed)
    runs = [f"run{i}" for i in range(n_runs)]
    names = [f"r{i}" for i in range(replicas)]
    live = {names[0]}
    held: dict[str, str] = {}
    assert settle(runs, live, held, rng) <= 2
    for name in names[1:]:  # join one by one
        live.add(name)
        assert settle(runs, live, held, rng) <= 4
    while len(live) > 1:  # and die one by one (their leases expire)
        dead = rng.choice(sorted(live))
        live.discard(dead)
        held = {r: h for r, h in held.items() if h != dead}
        assert settle(runs, live, held, rng) <= 2
