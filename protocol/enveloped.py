"""The enveloped blob: one home for how a blob travels with its envelope.

A blob (an update, a global model) travels as chunk messages (``protocol.chunking``), each
carrying its envelope (``UpdateMeta``, ``ModelMeta``) as JSON in the ``x-fedmq-envelope``
header, so that any chunk says what it belongs to. ``headers`` builds a chunk's headers and
``read`` takes them apart, in a pair, as NVFlare's DXO and Flower's parameter codec pair
theirs: every sender and receiver goes through these two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from protocol import chunking
from protocol.messages import Envelope, MessageError, parse_as

ENVELOPE_HEADER = "x-fedmq-envelope"

M = TypeVar("M", bound=Envelope)


class EnvelopeError(ValueError):
    """A chunk message that is not a well-formed enveloped chunk; the text says why."""


def headers(chunk: chunking.Chunk, envelope: Envelope | str) -> dict[str, Any]:
    """The headers of ``chunk``'s message: its chunk fields and its envelope (a message, or
    its JSON when the caller already has it, as for every chunk of one blob)."""
    text = envelope if isinstance(envelope, str) else envelope.model_dump_json()
    return {**chunking.to_headers(chunk), ENVELOPE_HEADER: text}


def read(
    message_headers: Mapping[str, Any], body: bytes, kind: type[M], what: str
) -> tuple[chunking.Chunk, M]:
    """The chunk and its envelope (of type ``kind``); ``EnvelopeError`` naming ``what``
    (e.g. "update") when either is missing or malformed."""
    try:
        chunk = chunking.from_message(dict(message_headers), body)
    except chunking.ChunkError as e:
        raise EnvelopeError(f"malformed chunk: {e}") from None
    raw = message_headers.get(ENVELOPE_HEADER)
    if not isinstance(raw, str | bytes):
        raise EnvelopeError(f"missing {ENVELOPE_HEADER} header")
    try:
        envelope = parse_as(raw, kind)
    except MessageError as e:
        raise EnvelopeError(f"malformed {what} envelope: {e}") from None
    return chunk, envelope
