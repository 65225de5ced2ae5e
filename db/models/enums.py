"""States kept in the database.

The client and round states are the wire's (``protocol.messages``), re-exported: one
definition, so a stored state and a state on the wire are the same object. The others are
the database's own. The values are what is stored, so they must never be renamed without a
migration.
"""

from __future__ import annotations

import enum

from protocol.messages.envelope import ClientState, RoundState

__all__ = [
    "FINISHED_ROUND",
    "PENDING_PARTICIPATION",
    "BlobKind",
    "ClientState",
    "ParticipationState",
    "RoundState",
    "RunStatus",
]


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"


class ParticipationState(enum.StrEnum):
    """One client's part in one round.

    selected → training → update; dropped when it leaves mid-round (taken out of the
    expected set); late when its update arrives after the round closed (kept, not counted).
    """

    SELECTED = "selected"
    TRAINING = "training"
    UPDATE = "update"
    DROPPED = "dropped"
    LATE = "late"


class BlobKind(enum.StrEnum):
    MODEL = "model"
    UPDATE = "update"
    OTHER = "other"


# Participations still owed an update: the round waits for these.
PENDING_PARTICIPATION = (ParticipationState.SELECTED, ParticipationState.TRAINING)
# Rounds whose work is over; only these may lose their update blobs to retention.
FINISHED_ROUND = (RoundState.DONE, RoundState.FAILED)
