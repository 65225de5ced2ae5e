"""The machine's copy-on-write client map answers exactly as a dict would, and tells the
snapshot diff every record that may have changed."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.state.clientmap import ClientMap, Draft, changed_since
from orchestrator.state.model import ClientRecord
from protocol.messages import ClientState


def _rec(cid: str, seen: float) -> ClientRecord:
    return ClientRecord(cid, ClientState.READY, 0.0, seen, 1)


ids = st.sampled_from([f"c{i}" for i in range(300)])
# Each step writes some records (existing or new ids) into a draft of the last map.
steps = st.lists(st.lists(st.tuples(ids, st.floats(0, 1e6)), max_size=40), max_size=30)


@given(st.integers(0, 200), steps)
def test_a_chain_of_drafts_reads_like_the_dict_it_stands_for(
    n: int, writes: list[list[tuple[str, float]]]
) -> None:
    base = {f"c{i}": _rec(f"c{i}", 0.0) for i in range(n)}
    current: Mapping[str, ClientRecord] = base
    model = dict(base)
    history: list[tuple[Mapping[str, ClientRecord], dict[str, ClientRecord]]] = [(base, dict(base))]
    for step in writes:
        draft = Draft(current)
        for cid, seen in step:
            draft[cid] = _rec(cid, seen)
            model[cid] = _rec(cid, seen)
        current = draft.result()
        history.append((current, dict(model)))
    for m, expected in history:
        assert dict(m.items()) == expected
        assert len(m) == len(expected)
        assert sorted(m) == sorted(expected)
        assert all(m.get(k) == v for k, v in expected.items())
        assert "nobody" not in m and m.get("nobody") is None
    # Every pair (earlier, later): the ids changed between them are among those named.
    for i, (old, old_dict) in enumerate(history):
        for new, new_dict in history[i:]:
            ids, _ = changed_since(old, new)
            named = set(ids)
            really = {k for k, v in new_dict.items() if old_dict.get(k) != v}
            assert really <= named


def test_a_step_that_changes_nothing_keeps_the_same_map() -> None:
    base = {"a": _rec("a", 1.0)}
    assert Draft(base).result() is base


def test_many_changes_fold_into_a_new_base_and_the_old_maps_are_untouched() -> None:
    base = {f"c{i}": _rec(f"c{i}", 0.0) for i in range(1000)}
    maps = [ClientMap.extend(base, {})]
    for i in range(400):
        maps.append(ClientMap.extend(maps[-1], {f"c{i}": _rec(f"c{i}", 1.0)}))
    assert all(v.last_seen == 0.0 for v in base.values())  # the base was never written
    last = maps[-1]
    assert sum(1 for v in last.values() if v.last_seen == 1.0) == 400
    assert len(last._upper) <= max(64, len(base) // 8)  # folded on the way
    assert maps[10]["c9"].last_seen == 1.0 and maps[10]["c10"].last_seen == 0.0
