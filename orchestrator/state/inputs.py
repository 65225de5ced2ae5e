"""What the round machine consumes: client messages, operator commands, task outcomes, time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.state.secagg import KeysIn, RevealIn, SharesIn
from protocol.messages import ClientState, CommandAction

# --- from clients ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientJoined:
    """A client registered, or an offline (not kicked) client registers again."""

    client_id: str


@dataclass(frozen=True, slots=True)
class ClientReady:
    client_id: str


@dataclass(frozen=True, slots=True)
class ClientSignal:
    """A client reports a state; the legal moves are in ``machine.SIGNAL_RULES``."""

    client_id: str
    state: ClientState


@dataclass(frozen=True, slots=True)
class Heartbeat:
    client_id: str


@dataclass(frozen=True, slots=True)
class ClientLeft:
    client_id: str


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """A client's update for ``round`` is durably stored under ``ref``."""

    client_id: str
    round: int
    ref: str
    num_samples: int


@dataclass(frozen=True, slots=True)
class SecAggMessage:
    """A device's SecAgg+ stage message (keys, share boxes, revealed shares) for round
    ``round`` attempt ``attempt``; ``event`` is the sub-machine's input made from it."""

    client_id: str
    round: int
    attempt: int
    event: KeysIn | SharesIn | RevealIn


# --- time -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (the time itself is ``step``'s ``now``): heartbeats and deadlines expire."""


# --- operator commands ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientKicked:
    client_id: str


@dataclass(frozen=True, slots=True)
class Autorun:
    rounds: int


@dataclass(frozen=True, slots=True)
class StopAutorun:
    pass


@dataclass(frozen=True, slots=True)
class OpenRound:
    """Manual step: open the next round (or the pending retry) now."""


@dataclass(frozen=True, slots=True)
class CloseRound:
    """Close the open round now, if it has its quorum."""


@dataclass(frozen=True, slots=True)
class Pause:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    pass


# --- task outcomes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AggregationSucceeded:
    round: int
    model_version: int
    # Set when this version spent the run's privacy budget: no further round may open.
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class AggregationFailed:
    round: int
    error: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class EvaluationFinished:
    round: int
    metrics: Mapping[str, float] = field(default_factory=dict)


Input = (
    ClientJoined
    | ClientReady
    | ClientSignal
    | Heartbeat
    | ClientLeft
    | UpdateReceived
    | SecAggMessage
    | Tick
    | ClientKicked
    | Autorun
    | StopAutorun
    | OpenRound
    | CloseRound
    | Pause
    | Resume
    | AggregationSucceeded
    | AggregationFailed
    | EvaluationFinished
)


def command_event(
    action: CommandAction, rounds: int | None = None, target_client: str | None = None
) -> Input:
    """The machine input for an operator ``Command`` (its arguments were validated on the wire)."""
    match action:
        case CommandAction.AUTORUN:
            if rounds is None:
                raise ValueError("autorun needs 'rounds'")
            return Autorun(rounds)
        case CommandAction.KICK:
            if target_client is None:
                raise ValueError("kick needs 'target_client'")
            return ClientKicked(target_client)
        case CommandAction.STOP_AUTORUN:
            return StopAutorun()
        case CommandAction.OPEN_ROUND:
            return OpenRound()
        case CommandAction.CLOSE_ROUND:
            return CloseRound()
        case CommandAction.PAUSE:
            return Pause()
        case CommandAction.RESUME:
            return Resume()
    raise ValueError(f"unknown command action {action!r}")
