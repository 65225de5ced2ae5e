"""Bytes → message, or one ``MessageError`` that says what is wrong."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from protocol.messages.envelope import SCHEMA_VERSION, Envelope
from protocol.messages.errors import MessageError
from protocol.messages.models import (
    Command,
    Event,
    Heartbeat,
    ModelMeta,
    Register,
    Registered,
    RoundAnnouncement,
    Signal,
    UpdateMeta,
)
from protocol.messages.secagg import (
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)

Message = Annotated[
    Register
    | Registered
    | Signal
    | Heartbeat
    | Command
    | RoundAnnouncement
    | UpdateMeta
    | ModelMeta
    | Event
    | SecAggKeys
    | SecAggRoster
    | SecAggShares
    | SecAggInbox
    | SecAggUnmask
    | SecAggReveal,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
MESSAGE_TYPES: tuple[type[Envelope], ...] = (
    Register,
    Registered,
    Signal,
    Heartbeat,
    Command,
    RoundAnnouncement,
    UpdateMeta,
    ModelMeta,
    Event,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggInbox,
    SecAggUnmask,
    SecAggReveal,
)

DEFAULT_MAX_BYTES = 1024 * 1024
M = TypeVar("M", bound=Envelope)


def _describe(err: ValidationError, kind: str) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = e["loc"][1:] if e["loc"][:1] == (kind,) else e["loc"]  # drop the union tag
        where = ".".join(str(p) for p in loc) or "message"
        parts.append(f"{where}: {e['msg']}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _load(data: bytes | str, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, larger than the limit {max_bytes}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise MessageError(f"not JSON: {e}") from None
    except RecursionError:
        raise MessageError("not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise MessageError(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MessageError(
            f"unsupported schema_version {version!r}: this build speaks {SCHEMA_VERSION}"
        )
    return obj


def parse_message(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse any message; dispatches on its ``type``."""
    obj = _load(data, max_bytes)
    kind = obj.get("type")
    known = sorted(t.model_fields["type"].default for t in MESSAGE_TYPES)
    if kind not in known:
        raise MessageError(f"unknown message type {kind!r}; expected one of {', '.join(known)}")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as e:
        raise MessageError(f"invalid {kind} message: {_describe(e, str(kind))}") from None


def parse_as(data: bytes | str, cls: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Parse a message that must be of type ``cls`` (a queue that carries one kind)."""
    msg = parse_message(data, max_bytes=max_bytes)
    if not isinstance(msg, cls):
        expected = cls.model_fields["type"].default
        raise MessageError(f"expected a {expected} message, got {msg.type}")
    return msg


def encode_message(msg: Envelope) -> bytes:
    return msg.to_json()
