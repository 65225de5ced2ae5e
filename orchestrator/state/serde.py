"""A federation to and from JSON-able dicts, for the service to save and restore it.

The shapes map one-to-one onto rows: ``policy`` and the run scalars onto the run, each of
``clients`` onto a client row, ``round`` onto the current round attempt and its ``received``
onto update rows. ``from_dict(to_dict(f)) == f`` for every reachable state.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from orchestrator.state.model import ClientRecord, Federation, Round, Update
from orchestrator.state.policy import RoundPolicy
from protocol.messages import ClientState, RoundState


def client_to_dict(c: ClientRecord) -> dict[str, Any]:
    return {**asdict(c), "state": c.state.value}


def client_from_dict(d: dict[str, Any]) -> ClientRecord:
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
        }
    )


def to_dict(fed: Federation) -> dict[str, Any]:
    return {
        "run_id": fed.run_id,
        "policy": asdict(fed.policy),
        "clients": [client_to_dict(c) for _, c in sorted(fed.clients.items())],
        "round": None if fed.round is None else round_to_dict(fed.round),
        "autorun_remaining": fed.autorun_remaining,
        "paused": fed.paused,
        "last_completed_round": fed.last_completed_round,
        "model_version": fed.model_version,
    }


def from_dict(d: dict[str, Any]) -> Federation:
    clients = [client_from_dict(c) for c in d["clients"]]
    return Federation(
        run_id=d["run_id"],
        policy=RoundPolicy(**d["policy"]),
        clients={c.client_id: c for c in clients},
        round=None if d["round"] is None else round_from_dict(d["round"]),
        autorun_remaining=d["autorun_remaining"],
        paused=d["paused"],
        last_completed_round=d["last_completed_round"],
        model_version=d["model_version"],
    )
