"""Request and response bodies of the gateway (JSON; blobs travel as raw bytes)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.messages.envelope import Detail, Ident

SignalState = Literal["join", "ready", "training", "update", "finish", "offline", "heartbeat"]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: Ident | None = Field(None, description="Default: the gateway's run")
    display_name: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "device"
    device_info: Detail = Field(default_factory=dict)


class Registration(BaseModel):
    run_id: str
    client_id: str
    token: str = Field(description="Bearer token for every later call of this client")
    signing_key: str = Field(
        description="The orchestrator's Ed25519 public key (base64): pin it, and verify "
        "every message of /messages against it"
    )


class SignalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: SignalState


class AutorunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rounds: Annotated[int, Field(ge=1, le=100_000)]


class Sent(BaseModel):
    """What the gateway put on the bus; the orchestrator acts on it asynchronously."""

    status: Literal["sent", "duplicate"]
    message_id: str | None = None
    round: int | None = None
    bytes: int | None = None


class RoundInfo(BaseModel):
    run_id: str
    run_status: str
    model_version: int | None = Field(description="The newest global model version")
    round: int | None = Field(description="The newest round's number (None before the first)")
    attempt: int | None = None
    state: str | None = None
    base_model_version: int | None = None
    selected: list[str] = Field(default_factory=list)
    received: int = 0
    quorum: int | None = None
    deadline: datetime | None = None
    autorun_remaining: int | None = None


class SignedMessage(BaseModel):
    body: str = Field(description="The message's exact JSON text, as the orchestrator signed it")
    signature: str | None = Field(
        description="Its x-fedmq-signature (base64 Ed25519; docs/architecture.md), "
        "None when it came unsigned"
    )


class Messages(BaseModel):
    """JSON envelopes from the client's device queue (round announcements, notices);
    model chunks are left out: the model is fetched from ``/models/{version}``.
    ``signed`` holds the same messages as signed, in the same order: act only on those
    whose signature verifies."""

    messages: list[dict[str, Any]]
    signed: list[SignedMessage] = Field(default_factory=list)
