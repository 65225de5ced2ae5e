"""All tables. Importing this package registers every model on ``Base.metadata``."""

from db.models.base import NAMING_CONVENTION, Base
from db.models.blobs import Blob, BlobChunk
from db.models.clients import Client
from db.models.enums import (
    BlobKind,
    ClientState,
    ParticipationState,
    RoundState,
    RunStatus,
)
from db.models.events import Event, ProcessedMessage
from db.models.health import ServiceHealth
from db.models.keys import SigningKey
from db.models.orchestrator import InboxUpdate, MachinePart, OutboxItem, UploadChunk
from db.models.replicas import Replica, RunLease
from db.models.rounds import Participation, Round
from db.models.runs import Run
from db.models.types import UTCDateTime, utcnow
from db.models.versions import ModelVersion

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "Blob",
    "BlobChunk",
    "BlobKind",
    "Client",
    "ClientState",
    "Event",
    "InboxUpdate",
    "MachinePart",
    "ModelVersion",
    "OutboxItem",
    "Participation",
    "ParticipationState",
    "ProcessedMessage",
    "Replica",
    "Round",
    "RoundState",
    "Run",
    "RunLease",
    "RunStatus",
    "ServiceHealth",
    "SigningKey",
    "UTCDateTime",
    "UploadChunk",
    "utcnow",
]
