"""The wire of edge split training: per-session queues, request/reply envelopes, tensors.

One edge session (``session_id``) serves many devices. Devices publish ``SplitRequest``s
to the session's queue ``edge.<session>`` through the default exchange; the edge answers
each with a ``SplitReply`` on the device's own reply queue ``edge.<session>.reply.<client>``.
Both queues are transient (not durable, auto-deleted, no dead-letter exchange): an
activation is worthless after the step it belongs to, and a queue that dies with its
consumer turns "the edge is gone" into an immediate ``Unroutable`` on the device's next
publish instead of a request waiting forever. The request queue is exclusive to the
edge's connection, the reply queue to the device's.

A message is the envelope's JSON in the ``x-fedmq-envelope`` header and, for ``forward`` and
``backward``, one tensor as a codec blob in the body (``encode_tensor``: bf16 by default,
as the paper; fp32 for exact runs). Replies carry the request's ``correlation_id`` and
``step``, so a device can drop a late answer to a request it has given up on.

Steps per batch: ``forward`` (head activations) -> reply (body output); ``backward``
(gradient at the body output) -> reply (gradient at the head output). ``leave`` ends a
device's part in the session (no reply).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field, StringConstraints, ValidationError

from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode
from protocol.enveloped import ENVELOPE_HEADER
from protocol.messages.envelope import Envelope, Ident, MessageId, Token
from protocol.messages.errors import MessageError
from protocol.topology import Queue, Topology, _word

DEFAULT_EXCHANGE = ""  # AMQP's default exchange: the routing key is the queue's name
TENSOR_NAME = "t"
MAX_ENVELOPE_BYTES = 16 * 1024

Phase = Literal["forward", "backward", "leave"]


def edge_request_queue(session_id: str) -> str:
    return f"edge.{_word('session id', session_id)}"


def edge_reply_queue(session_id: str, client_id: str) -> str:
    return f"edge.{_word('session id', session_id)}.reply.{_word('client id', client_id)}"


def round_session_id(run_id: str, round_number: int, attempt: int = 1) -> str:
    """The edge session of a run's round attempt under the orchestrator (SplitFed): devices
    and the edge both derive it from the round announcement, so nothing else has to carry
    it. A retried attempt gets a session of its own: the failed attempt's session may still
    hold its queue, and its body is dropped with the attempt."""
    suffix = "" if int(attempt) <= 1 else f"-a{int(attempt)}"
    return _word("session id", f"{run_id}-r{int(round_number)}{suffix}")


def _transient(name: str) -> Queue:
    return Queue(name, durable=False, exclusive=True, auto_delete=True, dead_letter_exchange=None)


def edge_session_topology(session_id: str) -> Topology:
    """The edge's request queue; declared by the edge's own consumer."""
    return Topology(queues=(_transient(edge_request_queue(session_id)),))


def device_reply_topology(session_id: str, client_id: str) -> Topology:
    """A device's reply queue; declared by the device's own consumer."""
    return Topology(queues=(_transient(edge_reply_queue(session_id, client_id)),))


# Activations and gradients travel as float tensors: the lossy update encodings (int8,
# top-k) are not for them.
LINK_ENCODINGS = frozenset({Encoding.FP32, Encoding.BF16, Encoding.FP16})


def _link_encoding(encoding: Encoding) -> Encoding:
    if encoding not in LINK_ENCODINGS:
        raise ValueError(f"split tensors travel as fp32, bf16 or fp16, not {encoding.value}")
    return encoding


LinkEncoding = Annotated[Encoding, AfterValidator(_link_encoding)]


class SplitRequest(Envelope):
    """A device's half of one exchange; ``run_id`` is the run the session trains for.

    ``token`` is the client's token from registration: an edge session that serves a run's
    round refuses a request whose client id and token do not match that run's client."""

    type: Literal["split.request"] = "split.request"
    client_id: Ident
    token: Token | None = None
    session_id: Ident
    phase: Phase
    step: Annotated[int, Field(ge=0)]
    correlation_id: MessageId
    encoding: LinkEncoding = Encoding.BF16


class SplitReply(Envelope):
    """The edge's answer to one request; ``error`` set means the request failed."""

    type: Literal["split.reply"] = "split.reply"
    client_id: Ident
    session_id: Ident
    phase: Phase
    step: Annotated[int, Field(ge=0)]
    correlation_id: MessageId
    error: Annotated[str, StringConstraints(max_length=1000)] | None = None


def envelope_headers(msg: SplitRequest | SplitReply) -> dict[str, Any]:
    return {ENVELOPE_HEADER: msg.model_dump_json()}


def _parse(headers: dict[str, Any], cls: type[SplitRequest] | type[SplitReply]) -> Any:
    raw = headers.get(ENVELOPE_HEADER)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise MessageError(f"no {ENVELOPE_HEADER} header")
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise MessageError(f"envelope is {len(raw)} bytes, over {MAX_ENVELOPE_BYTES}")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MessageError(f"invalid {cls.__name__}: {where}: {first['msg']}") from None


def parse_request(headers: dict[str, Any]) -> SplitRequest:
    result: SplitRequest = _parse(headers, SplitRequest)
    return result


def parse_reply(headers: dict[str, Any]) -> SplitReply:
    result: SplitReply = _parse(headers, SplitReply)
    return result


def encode_tensor(array: np.ndarray, encoding: str = "bf16") -> bytes:
    """One float tensor as a codec blob (zstd level 1, no byte shuffling: per-batch
    activations are encoded once and must be cheap)."""
    return encode(
        {TENSOR_NAME: np.asarray(array, dtype=np.float32)},
        Encoding(encoding),
        shuffle=False,
        level=1,
    )


def decode_tensor(blob: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """The float32 tensor of ``encode_tensor``'s blob; ``CodecError`` for anything else."""
    tensors = decode(blob, limits=limits).tensors
    if set(tensors) != {TENSOR_NAME}:
        raise CodecError(f"expected one tensor {TENSOR_NAME!r}, got {sorted(tensors)[:5]}")
    arr = tensors[TENSOR_NAME]
    if arr.dtype != np.float32 or arr.ndim < 2 or arr.shape[0] < 1:
        raise CodecError(f"expected a float32 batch (N, ...), got {arr.dtype}{list(arr.shape)}")
    return arr
