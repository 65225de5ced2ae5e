"""The snapshot saved in parts: writing only ``changes`` after every step rebuilds the state.

The random event sequences of the round machine's stateful test drive it; a dict stands in
for ``runs.machine`` and the ``machine_parts`` rows, through JSON as the database keeps them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

from orchestrator.state import ClientRecord, Federation, Round, RoundPolicy, Update, to_dict
from orchestrator.state.serde import changes, client_to_dict, is_split, join, split
from protocol.messages import ClientState, RoundState
from tests.unit.test_round_machine_stateful import RoundMachine


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class PartsMachine(RoundMachine):
    def __init__(self) -> None:
        super().__init__()
        self.head: dict[str, Any] | None = None
        self.parts: dict[str, Any] = {}
        self.saved: Federation | None = None

    def apply(self, event: Any) -> None:
        super().apply(event)
        if self.saved is not None and self.saved.run_id != self.fed.run_id:
            self.saved = None  # a fresh federation (the machine's start rule)
        if self.saved is None:
            self.head, self.parts = None, {}
        diff = changes(self.saved, self.fed)
        if self.saved is not None and self.fed == self.saved:
            assert not diff, "an unchanged state writes nothing"
        if diff.head is not None:
            self.head = _json(diff.head)
        for key in diff.deletes:
            self.parts.pop(key)  # deletes only what is there
        for key, data in diff.upserts.items():
            self.parts[key] = _json(data)
        for cid in diff.clients:
            assert self.saved is None or self.saved.clients.get(cid) != self.fed.clients[cid]
        self.saved = self.fed

    @invariant()
    def the_parts_rebuild_the_state(self) -> None:
        if self.head is not None:
            assert join(self.head, self.parts.items()) == self.fed


TestPartsMachine = PartsMachine.TestCase
TestPartsMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _fed() -> Federation:
    clients = {
        f"c{i}": ClientRecord(f"c{i}", ClientState.TRAINING, 1.0, 2.0 + i, 1) for i in range(5)
    }
    rnd = Round(
        number=1,
        attempt=1,
        state=RoundState.OPEN,
        selected=tuple(clients),
        quorum=3,
        opened_at=5.0,
        deadline=50.0,
        base_model_version=0,
        received=(Update("c1", "sha1", 10), Update("c3", "sha3", 7)),
        dropped=("c4",),
    )
    return Federation("r", RoundPolicy(min_clients=2), clients, rnd, autorun_remaining=2)


def test_split_and_join_round_trip_through_json() -> None:
    fed = _fed()
    head, parts = split(fed)
    assert is_split(head) and "clients" not in head and "received" not in head["round"]
    assert sorted(parts) == [*(f"c:c{i}" for i in range(5)), "u:0", "u:1"]
    assert join(_json(head), _json(parts).items()) == fed


def test_a_whole_snapshot_still_loads() -> None:
    fed = _fed()
    assert join(_json(to_dict(fed)), []) == fed


def test_one_update_writes_one_client_and_one_update_part() -> None:
    old = _fed()
    assert old.round is not None
    rec = old.clients["c2"]
    new = Federation(
        old.run_id,
        old.policy,
        {**old.clients, "c2": ClientRecord("c2", ClientState.UPDATE, 1.0, 9.0, 1)},
        replace(old.round, received=(*old.round.received, Update("c2", "s", 1))),
        autorun_remaining=old.autorun_remaining,
    )
    diff = changes(old, new)
    assert diff.head is None
    assert diff.clients == ["c2"] and rec != new.clients["c2"]
    assert diff.upserts == {
        "c:c2": client_to_dict(new.clients["c2"]),
        "u:2": {"client_id": "c2", "ref": "s", "num_samples": 1},
    }
    assert diff.deletes == []


def test_a_new_round_deletes_the_old_rounds_received_parts() -> None:
    old = _fed()
    assert old.round is not None
    new = Federation(
        old.run_id,
        old.policy,
        old.clients,
        replace(old.round, received=()),
        autorun_remaining=old.autorun_remaining,
    )
    diff = changes(old, new)
    assert diff.head is None and diff.upserts == {} and diff.deletes == ["u:0", "u:1"]
