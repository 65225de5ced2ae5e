"""The envelope every JSON message on the wire shares."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1

# Run and client ids become AMQP routing-key words ("update.<run>.<round>"), so no dots,
# and they must be safe to show on a dashboard.
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MessageId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
Token = Annotated[str, StringConstraints(min_length=16, max_length=128)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# An HMAC-SHA256 tag (protocol/auth.py): what a device or operator sends instead of its token.
Mac = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# An X25519 public key (protocol/sealing.py) and a box sealed to one.
PublicKeyHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SealedBox = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{80,512}$")]
RoundNumber = Annotated[int, Field(ge=0, le=10_000_000)]
# Free-form detail stays small and flat so that nothing nested can be used to blow up parsing.
Scalar = str | int | float | bool | None
Detail = dict[Annotated[str, StringConstraints(max_length=64)], Scalar | list[Scalar]]


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError("timestamp must carry a timezone")
    return ts.astimezone(UTC)


class ClientState(StrEnum):
    JOIN = "join"
    READY = "ready"
    TRAINING = "training"
    UPDATE = "update"
    FINISH = "finish"
    OFFLINE = "offline"


class RoundState(StrEnum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


def new_message_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every message has: what it is, whose it is, and how to de-duplicate it."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)

    schema_version: int = SCHEMA_VERSION
    type: str
    run_id: Ident
    client_id: Ident | None = None
    round: RoundNumber | None = None
    message_id: MessageId = Field(default_factory=new_message_id)
    timestamp: Annotated[datetime, AfterValidator(_utc)] = Field(default_factory=utcnow)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def short(self) -> dict[str, Any]:
        """The identifying fields, for events and logs."""
        return {
            "type": self.type,
            "run_id": self.run_id,
            "client_id": self.client_id,
            "round": self.round,
            "message_id": self.message_id,
        }
