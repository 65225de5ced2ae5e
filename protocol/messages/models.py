"""Every message type on the wire. Each is an ``Envelope`` with a literal ``type``."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from protocol.codec.encodings import Encoding
from protocol.messages.envelope import (
    ClientState,
    Detail,
    Envelope,
    Ident,
    Mac,
    PublicKeyHex,
    RoundNumber,
    RoundState,
    SealedBox,
    Sha256Hex,
)
from protocol.sealing import SealError, check_public_key

# A blob's encoding is the codec's own ``Encoding`` (one type from the codec to the wire): on
# the wire it is the value ("bf16"), and a message takes either the member or the value.
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# An Ed25519 public key, 32 bytes in base64.
PublicKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]


class Register(Envelope):
    """A device asks to join a run. It has no client id yet: the reply goes to ``reply_key``."""

    type: Literal["register"] = "register"
    display_name: Name
    reply_key: Ident
    device_info: Detail = Field(default_factory=dict)
    # Asks for a broker user of its own (protocol/permissions.py); a device on the shared
    # enrollment user can do nothing after registering without one.
    broker_account: bool = False
    # The public half of a key pair made for this registration: the token comes back sealed
    # to it (protocol/sealing.py), since anyone on a shared broker user may read the answer.
    reply_pub: PublicKeyHex

    @field_validator("reply_pub")
    @classmethod
    def _usable_key(cls, value: str) -> str:
        try:
            check_public_key(value)
        except SealError as e:
            raise ValueError(str(e)) from None
        return value


class Registered(Envelope):
    """The orchestrator's answer: the de-identified client id and its secret token, sealed
    to the ``Register``'s ``reply_pub`` (``protocol.sealing``; the context is
    ``registered_context``).

    ``broker_user`` is set when the orchestrator created the device's own broker user (its
    password is the token): the device reconnects as that user before anything else.
    ``signing_key`` is the orchestrator's Ed25519 public key (protocol/signing.py): the
    device pins it and drops whatever arrives on its queue without its signature."""

    type: Literal["registered"] = "registered"
    client_id: Ident
    reply_key: Ident
    sealed_token: SealedBox
    broker_user: Ident | None = None
    signing_key: PublicKey | None = None


def registered_context(run_id: str, reply_key: str, client_id: str) -> bytes:
    """What a sealed token is bound to: a box cannot be moved to another registration."""
    return f"registered\n{run_id}\n{reply_key}\n{client_id}".encode()


class Signal(Envelope):
    """A client's state change (join/ready/training/update/finish/offline)."""

    type: Literal["signal"] = "signal"
    client_id: Ident
    state: ClientState
    detail: Detail = Field(default_factory=dict)
    # HMAC under the client's token (protocol/auth.py); None only before ``auth.sign``.
    mac: Mac | None = None


class Heartbeat(Envelope):
    type: Literal["heartbeat"] = "heartbeat"
    client_id: Ident
    mac: Mac | None = None


class CommandAction(StrEnum):
    AUTORUN = "autorun"
    STOP_AUTORUN = "stop_autorun"
    OPEN_ROUND = "open_round"
    CLOSE_ROUND = "close_round"
    KICK = "kick"
    PAUSE = "pause"
    RESUME = "resume"


class Command(Envelope):
    """An operator's order to the orchestrator; confirmed by an ``Event`` naming this id."""

    type: Literal["command"] = "command"
    action: CommandAction
    rounds: Annotated[int, Field(ge=1, le=100_000)] | None = None
    target_client: Ident | None = None
    # HMAC under the operator token (protocol/auth.py), never the token itself.
    mac: Mac | None = None

    @model_validator(mode="after")
    def _arguments_match_action(self) -> Command:
        if self.action is CommandAction.AUTORUN and self.rounds is None:
            raise ValueError("autorun needs 'rounds'")
        if self.action is CommandAction.KICK and self.target_client is None:
            raise ValueError("kick needs 'target_client'")
        return self


class RoundAnnouncement(Envelope):
    """A round is open: who is selected, which global model to start from, by when to answer."""

    type: Literal["round"] = "round"
    round: RoundNumber
    model_version: Annotated[int, Field(ge=0)]
    model_sha256: Sha256Hex
    model_bytes: Annotated[int, Field(ge=0)]
    deadline: datetime
    selected: list[Ident]
    # The round's attempt (a retry reopens the round with the next one), and the selected
    # clients whose update from an earlier attempt already counts: they need not train.
    attempt: Annotated[int, Field(ge=1)] = 1
    carried: list[Ident] = Field(default_factory=list)
    train_config: Detail = Field(default_factory=dict)


class UpdateMeta(Envelope):
    """Describes a client's update blob; travels in the headers of every chunk of it."""

    type: Literal["update"] = "update"
    client_id: Ident
    round: RoundNumber
    base_model_version: Annotated[int, Field(ge=0)]
    num_samples: Annotated[int, Field(ge=1, le=10**12)]
    encoding: Encoding
    is_delta: bool = True
    blob_sha256: Sha256Hex
    blob_bytes: Annotated[int, Field(ge=1)]
    metrics: Detail = Field(default_factory=dict)
    # HMAC under the client's token over this envelope (which names the blob's SHA-256).
    mac: Mac | None = None


class ModelMeta(Envelope):
    """Describes a global model blob sent to devices (initial parameters or a new version)."""

    type: Literal["model"] = "model"
    model_version: Annotated[int, Field(ge=0)]
    blob_sha256: Sha256Hex
    blob_bytes: Annotated[int, Field(ge=1)]
    encoding: Encoding


class Event(Envelope):
    """Something that happened, for the audit trail, the dashboard and observers."""

    type: Literal["event"] = "event"
    kind: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    round_state: RoundState | None = None
    client_state: ClientState | None = None
    correlation_id: Ident | None = None
    detail: Detail = Field(default_factory=dict)
