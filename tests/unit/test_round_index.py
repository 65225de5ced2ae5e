"""The round's membership index (``Round.is_selected``, ``received_clients``,
``anyone_expected``) answers as the tuples it stands for, and is carried over exactly by
``with_update``, never copied into a round made with ``replace``."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.state import Round, Update
from orchestrator.state.model import Received
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


@given(st.lists(st.integers(0, 30), max_size=60), st.lists(st.integers(0, 60), max_size=10))
def test_received_versions_share_a_log_and_a_fork_copies(ids: list[int], forks: list[int]) -> None:
    """Each version of a round's received updates reads exactly as the tuple it stands for,
    whatever was appended to older or newer versions of the same history since."""
    versions = [Received()]
    expected: list[tuple[Update, ...]] = [()]
    for i in ids:
        u = Update(f"c{i}", f"ref{i}", i + 1)
        versions.append(versions[-1].append(u))
        expected.append((*expected[-1], u))
    # Appending to older versions (a step thrown away, then another from the same state).
    for k in forks:
        if k < len(versions):
            u = Update(f"fork{k}", "x", 1)
            versions.append(versions[k].append(u))
            expected.append((*expected[k], u))
    everyone = {u.client_id for e in expected for u in e} | {"nobody"}
    for v, e in zip(versions, expected, strict=True):
        assert v == e and tuple(v) == e and len(v) == len(e) and hash(v) == hash(e)
        present = {u.client_id for u in e}
        assert all(v.has_client(c) == (c in present) for c in everyone)
        if e:
            assert v[-1] == e[-1] and v[0:2] == e[0:2]
