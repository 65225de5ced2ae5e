"""The round's membership index (``Round.is_selected``, ``received_clients``,
``anyone_expected``) answers as the tuples it stands for, and is carried over exactly by
``with_update``, never copied into a round made with ``replace``."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.state import Round, Update
from protocol.messages import RoundState

IDS = [f"c{i}" for i in range(12)]


@st.composite
def rounds(draw: st.DrawFn) -> Round:
    selected = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=10))
    received = draw(st.lists(st.sampled_from(selected), unique=True)) if selected else []
    dropped = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=4))
    return Round(
        1,
        1,
        RoundState.OPEN,
        tuple(selected),
        1,
        0.0,
        10.0,
        0,
        received=tuple(Update(c, f"sha-{c}", 1) for c in received),
        dropped=tuple(sorted(dropped)),
    )


@given(rounds(), st.sampled_from(IDS))
def test_the_index_answers_as_the_tuples(rnd: Round, cid: str) -> None:
    assert rnd.is_selected(cid) == (cid in rnd.selected)
    assert rnd.received_clients == {u.client_id for u in rnd.received}
    assert rnd.anyone_expected == bool(rnd.expected)


@given(rounds())
def test_with_update_carries_the_index_and_replace_rebuilds_it(rnd: Round) -> None:
    waiting = [c for c in rnd.selected if c not in rnd.received_clients]
    for cid in waiting:
        rnd = rnd.with_update(Update(cid, f"sha-{cid}", 2))
        fresh = replace(rnd, received=rnd.received)  # no index: built from the tuples
        assert rnd.received_clients == fresh.received_clients
        assert rnd.anyone_expected == fresh.anyone_expected == bool(fresh.expected)
        assert rnd == fresh
