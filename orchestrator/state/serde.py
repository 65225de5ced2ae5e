"""A federation to and from JSON-able dicts, for the service to save and restore it.

The shapes map one-to-one onto rows: ``policy`` and the run scalars onto the run, each of
``clients`` onto a client row, ``round`` onto the current round attempt and its ``received``
onto update rows. ``from_dict(to_dict(f)) == f`` for every reachable state.

The service saves a federation in parts (``split``, ``changes``, ``join``): a head (the run
scalars, the policy and the round without its received updates) and one part per client
(key ``c:<id>``) and per received update (``u:<index>``), so that a step writes only the parts
it changed, whatever the fleet's size. ``join(*split(f)) == f``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from orchestrator.state import secagg as sa
from orchestrator.state.clientmap import changed_since
from orchestrator.state.model import (
    Buffer,
    Buffered,
    ClientRecord,
    Federation,
    Received,
    Round,
    Ticket,
    Update,
)
from orchestrator.state.policy import RoundPolicy
from protocol.messages import ClientState, RoundState


def client_to_dict(c: ClientRecord) -> dict[str, Any]:
    # By hand: dataclasses.asdict deep-copies every field, ~30 us a client, most of a large
    # fleet's save time.
    return {
        "client_id": c.client_id,
        "state": c.state.value,
        "joined_at": c.joined_at,
        "last_seen": c.last_seen,
        "eligible_from": c.eligible_from,
        "offline_reason": c.offline_reason,
        "availability": c.availability,
    }


def client_from_dict(d: dict[str, Any]) -> ClientRecord:
    # A record saved before availability was kept has none: it starts at the prior.
    return ClientRecord(**{**d, "state": ClientState(d["state"])})


def round_to_dict(r: Round) -> dict[str, Any]:
    return {
        "number": r.number,
        "attempt": r.attempt,
        "state": r.state.value,
        "selected": list(r.selected),
        "quorum": r.quorum,
        "opened_at": r.opened_at,
        "deadline": r.deadline,
        "base_model_version": r.base_model_version,
        "received": [u._asdict() for u in r.received],
        "dropped": list(r.dropped),
        "aggregation_retries": r.aggregation_retries,
        "model_version": r.model_version,
        "metrics": dict(r.metrics),
        "retry_pending": r.retry_pending,
        "failure": r.failure,
        "secagg": None if r.secagg is None else sa.round_to_dict(r.secagg),
    }


def round_from_dict(d: dict[str, Any]) -> Round:
    return Round(
        **{
            **d,
            "state": RoundState(d["state"]),
            "selected": tuple(d["selected"]),
            "received": tuple(Update(**u) for u in d["received"]),
            "dropped": tuple(d["dropped"]),
            "metrics": dict(d["metrics"]),
            # Saved before secure rounds existed: none.
            "secagg": None if d.get("secagg") is None else sa.round_from_dict(d["secagg"]),
        }
    )


def buffer_to_dict(b: Buffer) -> dict[str, Any]:
    return {
        "training": [list(t) for t in b.training],
        "updates": [list(u) for u in b.updates],
        "next_ticket": b.next_ticket,
        "expired": [list(e) for e in b.expired],
    }


def buffer_from_dict(d: Mapping[str, Any] | None) -> Buffer:
    # A snapshot saved before async runs existed has no buffer: an empty one.
    if not d:
        return Buffer()
    return Buffer(
        training=tuple(Ticket(*t) for t in d["training"]),
        updates=tuple(Buffered(*u) for u in d["updates"]),
        next_ticket=int(d["next_ticket"]),
        expired=tuple((str(c), int(n), str(w)) for c, n, w in d["expired"]),
    )


def to_dict(fed: Federation) -> dict[str, Any]:
    return {
        "run_id": fed.run_id,
        "policy": asdict(fed.policy),
        "clients": [client_to_dict(c) for _, c in sorted(fed.clients.items())],
        "round": None if fed.round is None else round_to_dict(fed.round),
        "autorun_remaining": fed.autorun_remaining,
        "paused": fed.paused,
        "stopped": fed.stopped,
        "last_completed_round": fed.last_completed_round,
        "model_version": fed.model_version,
        "split": fed.split,
        "buffer": buffer_to_dict(fed.buffer),
        "secagg": None if fed.secagg is None else dict(fed.secagg),
    }


def from_dict(d: dict[str, Any]) -> Federation:
    clients = [client_from_dict(c) for c in d["clients"]]
    return Federation(
        run_id=d["run_id"],
        policy=RoundPolicy.from_dict(d["policy"]),
        clients={c.client_id: c for c in clients},
        round=None if d["round"] is None else round_from_dict(d["round"]),
        autorun_remaining=d["autorun_remaining"],
        paused=d["paused"],
        stopped=d.get("stopped"),
        last_completed_round=d["last_completed_round"],
        model_version=d["model_version"],
        split=bool(d.get("split", False)),  # saved before split runs existed: not split
        buffer=buffer_from_dict(d.get("buffer")),
        secagg=d.get("secagg"),
    )


# --- in parts -------------------------------------------------------------------------------

# The head's format: 2 (parts). A head without it is a whole ``to_dict`` snapshot.
HEAD_FORMAT = 2
CLIENT_PREFIX = "c:"
UPDATE_PREFIX = "u:"


def client_key(client_id: str) -> str:
    return CLIENT_PREFIX + client_id


def update_key(index: int) -> str:
    return f"{UPDATE_PREFIX}{index}"


def head_to_dict(fed: Federation) -> dict[str, Any]:
    """``to_dict`` without the clients and without the round's received updates."""
    rnd = None
    if fed.round is not None:
        rnd = round_to_dict(replace(fed.round, received=()))
        del rnd["received"]
    return {
        "format": HEAD_FORMAT,
        "run_id": fed.run_id,
        "policy": asdict(fed.policy),
        "round": rnd,
        "autorun_remaining": fed.autorun_remaining,
        "paused": fed.paused,
        "stopped": fed.stopped,
        "last_completed_round": fed.last_completed_round,
        "model_version": fed.model_version,
        "split": fed.split,
        "buffer": buffer_to_dict(fed.buffer),
        "secagg": None if fed.secagg is None else dict(fed.secagg),
    }


def is_split(head: Mapping[str, Any]) -> bool:
    return head.get("format") == HEAD_FORMAT


def split(fed: Federation) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The head and every part of ``fed``."""
    parts = {client_key(cid): client_to_dict(c) for cid, c in fed.clients.items()}
    if fed.round is not None:
        for i, u in enumerate(fed.round.received):
            parts[update_key(i)] = u._asdict()
    return head_to_dict(fed), parts


def join(head: Mapping[str, Any], parts: Iterable[tuple[str, Mapping[str, Any]]]) -> Federation:
    """The federation saved as ``head`` and ``parts``; a whole (unsplit) snapshot as is."""
    if not is_split(head):
        return from_dict(dict(head))
    clients: dict[str, ClientRecord] = {}
    received: list[tuple[int, Update]] = []
    for key, data in parts:
        if key.startswith(CLIENT_PREFIX):
            clients[key[len(CLIENT_PREFIX) :]] = client_from_dict(dict(data))
        elif key.startswith(UPDATE_PREFIX):
            received.append((int(key[len(UPDATE_PREFIX) :]), Update(**data)))
        else:
            raise ValueError(f"unknown snapshot part {key!r}")
    received.sort(key=lambda r: r[0])
    if [i for i, _ in received] != list(range(len(received))):
        raise ValueError(f"snapshot of run {head['run_id']}: received updates have gaps")
    rnd = None
    if head["round"] is not None:
        rnd = round_from_dict({**head["round"], "received": []})
        rnd = replace(rnd, received=tuple(u for _, u in received))
    elif received:
        raise ValueError(f"snapshot of run {head['run_id']}: updates without a round")
    return Federation(
        run_id=head["run_id"],
        policy=RoundPolicy.from_dict(head["policy"]),
        clients=dict(sorted(clients.items())),
        round=rnd,
        autorun_remaining=head["autorun_remaining"],
        paused=head["paused"],
        stopped=head.get("stopped"),
        last_completed_round=head["last_completed_round"],
        model_version=head["model_version"],
        split=bool(head.get("split", False)),
        buffer=buffer_from_dict(head.get("buffer")),
        secagg=head.get("secagg"),
    )


@dataclass
class Changes:
    """What saving ``new`` over a stored ``old`` writes: the head (None: unchanged), the parts
    to insert or replace, and the keys of parts to delete; ``clients``: ids of the client
    records that changed (the projection writes only those)."""

    head: dict[str, Any] | None = None
    upserts: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.head is not None or bool(self.upserts) or bool(self.deletes)


def changes(old: Federation | None, new: Federation) -> Changes:
    """The parts to write to turn the stored ``old`` into ``new``; ``old`` None: nothing of
    the split format is stored yet (a new run, or a whole snapshot to split), so all of it.

    Cheap when little changed: ``new``'s client map knows which records a step may have
    replaced since ``old`` (``clientmap.changed_since``), and the others are not looked at.
    """
    if old is None:
        head, parts = split(new)
        return Changes(head=head, upserts=parts, clients=sorted(new.clients))
    out = Changes()
    if _head_differs(old, new):
        out.head = head_to_dict(new)
    before, after = old.clients, new.clients
    candidates, may_delete = changed_since(before, after)
    for cid in candidates:
        rec = after[cid]
        prev = before.get(cid)
        if prev is not rec and prev != rec:
            out.upserts[client_key(cid)] = client_to_dict(rec)
            out.clients.append(cid)
    if len(before) > len(after) or (may_delete and out.clients):
        out.deletes.extend(client_key(cid) for cid in before.keys() - new.clients.keys())
    old_r = old.round.received if old.round is not None else ()
    new_r = new.round.received if new.round is not None else ()
    if new_r is not old_r:
        if isinstance(new_r, Received) and new_r.shares_log(old_r):
            same = min(len(old_r), len(new_r))  # one history: the shorter is a prefix
        else:
            same = 0
            for a, b in zip(old_r, new_r, strict=False):
                if a is not b and a != b:
                    break
                same += 1
        for i in range(same, len(new_r)):
            out.upserts[update_key(i)] = new_r[i]._asdict()
        out.deletes.extend(update_key(i) for i in range(len(new_r), len(old_r)))
    return out


def _head_differs(old: Federation, new: Federation) -> bool:
    if (
        old.run_id != new.run_id
        or old.policy != new.policy
        or old.autorun_remaining != new.autorun_remaining
        or old.paused != new.paused
        or old.stopped != new.stopped
        or old.last_completed_round != new.last_completed_round
        or old.model_version != new.model_version
        or old.split != new.split
        or old.buffer != new.buffer
        or old.secagg != new.secagg
    ):
        return True
    a, b = old.round, new.round
    if a is b:
        return False
    if a is None or b is None:
        return True
    return replace(a, received=()) != replace(b, received=())
