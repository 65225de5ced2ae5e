"""What the round machine asks the service to do, and what it records.

Every effect is recordable: ``kind`` fits ``protocol.messages.Event.kind`` and ``detail()`` is
a flat ``Detail`` dict, so the service can write each one to the audit trail and publish it on
``fedmq.events`` without knowing its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from functools import cache
from typing import Any, ClassVar

from orchestrator.state.inputs import Input
from orchestrator.state.model import Update
from protocol.messages import ClientState

Scalar = str | int | float | bool | None


class Effect:
    __slots__ = ()
    kind: ClassVar[str]

    def detail(self) -> dict[str, Scalar | list[Scalar]]:
        out: dict[str, Scalar | list[Scalar]] = {}
        _flatten(out, "", self)
        return out


def _flatten(out: dict[str, Scalar | list[Scalar]], key: str, value: Any) -> None:
    if isinstance(value, Enum):
        out[key] = value.value
    elif value is None or isinstance(value, str | int | float | bool):
        out[key] = value
    elif isinstance(value, Mapping):
        for name, item in sorted(value.items()):
            _flatten(out, f"{key}.{name}", item)
    elif isinstance(value, tuple) and value and all(isinstance(v, Update) for v in value):
        # Column-wise, so that the detail stays a flat dict of scalars and lists of scalars.
        for name in Update._fields:
            out[f"{key}.{name}"] = [getattr(v, name) for v in value]
    elif isinstance(value, tuple):
        out[key] = [v.value if isinstance(v, Enum) else v for v in value]
    elif is_dataclass(value):
        if key:
            out[key] = type(value).__name__
        cls: type = type(value)
        for name in _field_names(cls):
            _flatten(out, f"{key}.{name}" if key else name, getattr(value, name))
    else:
        out[key] = repr(value)


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() rebuilds its tuple on every call: a tenth of the counter's time
    # went there, one call per counted update.
    return tuple(f.name for f in fields(cls))


# --- clients --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientStateChanged(Effect):
    kind: ClassVar[str] = "client.state"
    client_id: str
    old: ClientState | None
    new: ClientState
    reason: str


@dataclass(frozen=True, slots=True)
class ClientWentOffline(Effect):
    kind: ClassVar[str] = "client.offline"
    client_id: str
    old: ClientState
    reason: str


@dataclass(frozen=True, slots=True)
class UpdateAccepted(Effect):
    """Counted in the open round: the service may now acknowledge the update message."""

    kind: ClassVar[str] = "update.accepted"
    round: int
    client_id: str
    ref: str
    num_samples: int


# --- rounds ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenedRound(Effect):
    """Broadcast the announcement and the global model to ``selected``.

    ``carried`` already sent their update in an earlier attempt of this round; the service
    need not ask them to train again.
    """

    kind: ClassVar[str] = "round.opened"
    number: int
    attempt: int
    selected: tuple[str, ...]
    carried: tuple[str, ...]
    quorum: int
    deadline: float
    model_version: int


@dataclass(frozen=True, slots=True)
class RoundRetried(Effect):
    kind: ClassVar[str] = "round.retried"
    number: int
    attempt: int


@dataclass(frozen=True, slots=True)
class RoundClosed(Effect):
    kind: ClassVar[str] = "round.closed"
    number: int
    attempt: int
    received: int
    reason: str


@dataclass(frozen=True, slots=True)
class RoundFailed(Effect):
    """``final``: no retry follows; otherwise a new attempt opens as soon as it can."""

    kind: ClassVar[str] = "round.failed"
    number: int
    attempt: int
    reason: str
    final: bool


@dataclass(frozen=True, slots=True)
class RoundDone(Effect):
    kind: ClassVar[str] = "round.done"
    number: int
    model_version: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # the attempt, opened to done


# --- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DispatchAggregate(Effect):
    """Start the ``aggregate`` task. ``retry`` counts re-dispatches after retryable failures."""

    kind: ClassVar[str] = "task.aggregate"
    round: int
    attempt: int
    updates: tuple[Update, ...]
    base_model_version: int
    retry: int


@dataclass(frozen=True, slots=True)
class DispatchEdgeSession(Effect):
    """Start the edge session of a split run's round attempt for the ``devices`` that train
    in it (selected and not carried). Sent with the attempt's announcement, ahead of it."""

    kind: ClassVar[str] = "task.edge"
    round: int
    attempt: int
    devices: tuple[str, ...]
    deadline: float


@dataclass(frozen=True, slots=True)
class DispatchEvaluate(Effect):
    kind: ClassVar[str] = "task.evaluate"
    round: int
    model_version: int


# --- secure aggregation (``orchestrator.state.secure``) -------------------------------------


@dataclass(frozen=True, slots=True)
class SecAggSend(Effect):
    """Send a SecAgg+ stage message of round ``round`` attempt ``attempt`` to devices
    ``to``: ``what`` is "roster", "inbox" (one device's share boxes) or "unmask";
    ``payload`` the message's fields. Its record names only who got what: a roster or
    an inbox would make an event of kilobytes."""

    kind: ClassVar[str] = "secagg.send"
    round: int
    attempt: int
    what: str
    to: tuple[str, ...]
    payload: Mapping[str, Any] = field(default_factory=dict)

    def detail(self) -> dict[str, Scalar | list[Scalar]]:
        return {
            "round": self.round,
            "attempt": self.attempt,
            "what": self.what,
            "to": list(self.to[:64]),
            "recipients": len(self.to),
        }


@dataclass(frozen=True, slots=True)
class SecAggStage(Effect):
    """A secure round moved to ``stage`` (advertise, share, collect, unmask, done, failed)."""

    kind: ClassVar[str] = "secagg.stage"
    round: int
    attempt: int
    stage: str
    reason: str = ""


# --- run ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AutorunChanged(Effect):
    kind: ClassVar[str] = "autorun.changed"
    remaining: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class PauseChanged(Effect):
    kind: ClassVar[str] = "run.paused"
    paused: bool


# --- refusals: the state is left exactly as it was ------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected(Effect):
    """Invalid in the current state; the service answers/dead-letters it with ``reason``."""

    kind: ClassVar[str] = "rejected"
    event: Input
    reason: str
    rejoin: bool = False  # the client was written off and may join again (see Refused)


@dataclass(frozen=True, slots=True)
class Ignored(Effect):
    """Harmless: a duplicate or a stale re-delivery. The service acknowledges it and moves on."""

    kind: ClassVar[str] = "ignored"
    event: Input
    reason: str


# --- async runs (``orchestrator.state.buffered``) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatched(Effect):
    """Hand ``client_id`` model version ``model_version`` to train: its update names
    ``ticket`` as its round, and is expected by ``deadline``."""

    kind: ClassVar[str] = "async.dispatched"
    client_id: str
    ticket: int
    model_version: int
    deadline: float


@dataclass(frozen=True, slots=True)
class UpdateBuffered(Effect):
    """Accepted into the buffer: it will be counted in exactly one version step."""

    kind: ClassVar[str] = "update.buffered"
    client_id: str
    ticket: int
    ref: str
    num_samples: int
    base_version: int
    staleness: int
    buffered: int


@dataclass(frozen=True, slots=True)
class SlotExpired(Effect):
    kind: ClassVar[str] = "async.slot_expired"
    client_id: str
    ticket: int
    reason: str


@dataclass(frozen=True, slots=True)
class StaleDropped(Effect):
    """A buffered update that the model moved more than ``max_staleness`` versions past
    while it waited for its step: taken out of the buffer, never folded, with why."""

    kind: ClassVar[str] = "async.stale_dropped"
    client_id: str
    ticket: int
    ref: str
    staleness: int
    reason: str


@dataclass(frozen=True, slots=True)
class VersionStepOpened(Effect):
    """A version step: round ``number`` folds ``updates`` (the buffer's oldest) onto
    version ``base_model_version``; ``staleness`` is each update's, in the same order."""

    kind: ClassVar[str] = "async.version_step"
    number: int
    base_model_version: int
    updates: tuple[Update, ...]
    staleness: tuple[int, ...]
