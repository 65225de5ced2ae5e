"""Pydantic models for every message on the wire, and their one parse function."""

from protocol.codec.encodings import Encoding  # the one encoding type, also the wire's
from protocol.messages.envelope import (
    SCHEMA_VERSION,
    ClientState,
    Envelope,
    RoundState,
    new_message_id,
    utcnow,
)
from protocol.messages.errors import MessageError
from protocol.messages.models import (
    Command,
    CommandAction,
    Event,
    Heartbeat,
    ModelMeta,
    Register,
    Registered,
    RoundAnnouncement,
    Signal,
    UpdateMeta,
    registered_context,
)
from protocol.messages.parse import MESSAGE_TYPES, Message, encode_message, parse_as, parse_message
from protocol.messages.secagg import (
    SECAGG_TYPES,
    PeerKeys,
    RevealedShare,
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)

__all__ = [
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "SECAGG_TYPES",
    "ClientState",
    "Command",
    "CommandAction",
    "Encoding",
    "Envelope",
    "Event",
    "Heartbeat",
    "Message",
    "MessageError",
    "ModelMeta",
    "PeerKeys",
    "Register",
    "Registered",
    "RevealedShare",
    "RoundAnnouncement",
    "RoundState",
    "SecAggInbox",
    "SecAggKeys",
    "SecAggReveal",
    "SecAggRoster",
    "SecAggShares",
    "SecAggUnmask",
    "Signal",
    "UpdateMeta",
    "encode_message",
    "new_message_id",
    "parse_as",
    "parse_message",
    "registered_context",
    "utcnow",
]
