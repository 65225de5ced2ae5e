"""States kept in the database.

Defined here for now because ``protocol`` (which will own the wire names) is still being
written; when it lands these become re-exports of its enums. The values are the wire names
and what is stored, so they must never be renamed without a migration.
"""

from __future__ import annotations

import enum


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"


class ClientState(enum.StrEnum):
    """The paper's client states, plus offline (left, kicked, or silent too long)."""

    JOIN = "join"
    READY = "ready"
    TRAINING = "training"
    UPDATE = "update"
    FINISH = "finish"
    OFFLINE = "offline"


class RoundState(enum.StrEnum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
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
