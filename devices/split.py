"""The device's link to an edge split-training session over the bus (``EdgeLink``).

``BusEdge(bus, session_id, client_id)`` turns ``forward`` and ``backward`` into
request/reply exchanges with the session's edge worker (see ``protocol.split``): the
tensor is encoded (bf16 by default), published to ``edge.<session>`` with a fresh
correlation id, and the answer is taken from this device's reply queue, which its own
consumer declared (exclusive, auto-deleted). Replies whose correlation id is not the one
awaited (answers to a request given up on) are dropped.

Failures are ``EdgeUnavailable`` with a reason a person can act on: no session queue (the
edge never started, or ended: its queue died with it), no answer within ``timeout_s``
(the edge is gone or stuck), or an error the edge reported for this request.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from protocol.bus import Bus, BusError, Delivery, Unroutable
from protocol.codec import CodecError, DecodeLimits, Encoding
from protocol.messages import MessageError
from protocol.split import (
    DEFAULT_EXCHANGE,
    SplitReply,
    SplitRequest,
    decode_tensor,
    device_reply_topology,
    edge_reply_queue,
    edge_request_queue,
    encode_tensor,
    envelope_headers,
    parse_reply,
)

log = logging.getLogger(__name__)


class EdgeUnavailable(BusError):
    """The edge session cannot serve this device (gone, never started, or failing)."""


@dataclass
class LinkStats:
    """Seconds and bytes on the device side of the link, summed over exchanges."""

    exchanges: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    round_trip_s: float = 0.0  # publish to reply: bus, edge queueing and edge compute
    bytes_sent: int = 0
    bytes_received: int = 0


class BusEdge:
    """An ``EdgeLink`` to edge session ``session_id`` for device ``client_id``."""

    def __init__(
        self,
        bus: Bus,
        session_id: str,
        client_id: str,
        *,
        run_id: str | None = None,
        token: str | None = None,
        encoding: str = "bf16",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        limits: DecodeLimits = DecodeLimits(),
    ) -> None:
        self.bus, self.session_id, self.client_id = bus, session_id, client_id
        self.run_id = run_id or session_id
        self.token = token
        self.encoding, self.timeout_s, self.limits = encoding, timeout_s, limits
        self.connect_timeout_s = connect_timeout_s
        self.stats = LinkStats()
        self._step = 0
        self._connected = False
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._request_queue = edge_request_queue(session_id)
        self._consumer = bus.consume(
            edge_reply_queue(session_id, client_id),
            self._on_reply,
            prefetch=4,
            declare=device_reply_topology(session_id, client_id),
        )

    def forward(self, acts: Tensor) -> Tensor:
        return self._exchange("forward", acts)

    def _on_reply(self, delivery: Delivery) -> None:
        # Acked at once, on the consumer's thread: replies are transient, and a reply
        # nobody waits for any more is dropped anyway.
        delivery.ack()
        self._inbox.put(delivery)

    def backward(self, grad_out: Tensor) -> Tensor:
        out = self._exchange("backward", grad_out)
        self._step += 1
        return out

    def close(self) -> None:
        """Tell the edge this device is done (best effort), stop the reply consumer."""
        try:
            self._publish(self._request("leave", uuid.uuid4().hex), b"")
        except BusError as e:
            log.info("edge session %s: leave not delivered (%s)", self.session_id, e)
        self._consumer.stop()

    def __enter__(self) -> BusEdge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one exchange ------------------------------------------------------------------

    def _request(self, phase: str, correlation_id: str) -> SplitRequest:
        return SplitRequest(
            run_id=self.run_id,
            client_id=self.client_id,
            token=self.token,
            session_id=self.session_id,
            phase=phase,  # type: ignore[arg-type]
            step=self._step,
            correlation_id=correlation_id,
            encoding=Encoding(self.encoding),
        )

    def _exchange(self, phase: str, tensor: Tensor) -> Tensor:
        t0 = time.perf_counter()
        blob = encode_tensor(tensor.detach().float().cpu().numpy(), self.encoding)
        t1 = time.perf_counter()
        correlation_id = uuid.uuid4().hex
        self._publish(self._request(phase, correlation_id), blob)
        reply, body = self._await(phase, correlation_id)
        t2 = time.perf_counter()
        if reply.error is not None:
            raise EdgeUnavailable(
                f"edge session {self.session_id} refused {phase} of step {self._step}: "
                f"{reply.error}"
            )
        try:
            out = decode_tensor(body, self.limits)
        except CodecError as e:
            raise EdgeUnavailable(f"edge session {self.session_id} sent a bad tensor: {e}") from e
        t3 = time.perf_counter()
        s = self.stats
        s.exchanges += 1
        s.encode_s += t1 - t0
        s.round_trip_s += t2 - t1
        s.decode_s += t3 - t2
        s.bytes_sent += len(blob)
        s.bytes_received += len(body)
        return torch.from_numpy(np.ascontiguousarray(out))

    def _publish(self, request: SplitRequest, body: bytes) -> None:
        # The first request may race the edge starting: wait for its queue a while.
        deadline = time.monotonic() + (0 if self._connected else self.connect_timeout_s)
        while True:
            try:
                self.bus.publish(
                    DEFAULT_EXCHANGE,
                    self._request_queue,
                    body,
                    headers=envelope_headers(request),
                    message_id=request.message_id,
                    persistent=False,
                )
                self._connected = True
                return
            except Unroutable:
                if time.monotonic() >= deadline:
                    raise EdgeUnavailable(
                        f"edge session {self.session_id} is not serving: its queue "
                        f"{self._request_queue!r} does not exist (the session ended, its "
                        "worker died, or it never started)"
                    ) from None
                time.sleep(0.2)

    def _await(self, phase: str, correlation_id: str) -> tuple[SplitReply, bytes]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                delivery = self._inbox.get(timeout=max(0.0, left))
            except queue.Empty:
                raise EdgeUnavailable(
                    f"edge session {self.session_id} did not answer {phase} of step "
                    f"{self._step} within {self.timeout_s:g} s: the edge is gone or stuck"
                ) from None
            try:
                reply = parse_reply(delivery.headers)
            except MessageError as e:
                log.warning("edge session %s: malformed reply dropped: %s", self.session_id, e)
                continue
            if reply.correlation_id == correlation_id:
                return reply, delivery.body
            log.info("edge session %s: late reply %s dropped", self.session_id, reply.phase)
