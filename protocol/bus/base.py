"""The Bus contract: one small interface, two adapters (``AmqpBus`` on pika, ``InProcessBus``).

Shaped after dramatiq's ``broker.py`` / ``brokers/rabbitmq.py`` / ``brokers/stub.py``. The
delivery guarantee is at-least-once: a message is settled by ``ack``, ``requeue`` or ``reject``
(dead-letter with a reason), and consumers must tolerate redeliveries (envelopes carry a
message id for de-duplication).
"""

from __future__ import annotations

import logging
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.bus.errors import BusError
from protocol.bus.health import HealthSnapshot
from protocol.topology import DEAD_LETTER_EXCHANGE, Topology

log = logging.getLogger(__name__)

REASON_HEADER = "x-fedmq-reason"
ORIGINAL_EXCHANGE_HEADER = "x-fedmq-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-fedmq-original-routing-key"
ORIGINAL_QUEUE_HEADER = "x-fedmq-original-queue"
# A reason is for humans reading the dead-letter queue; a whole traceback does not belong there.
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class BusConfig:
    """Explicit transport settings, passed down from ``fedmq``'s settings (protocol may not
    import them).

    ``reconnect_attempts`` bounds one call (publish, get, declare): after that many failed
    attempts it raises ``ConnectionLost`` and its caller decides (the outbox tries again on
    the next tick, a device backs off and rejoins). A consumer never gives up on a broker
    that went away: it reconnects for as long as it is not stopped (issue 17: an outage of
    a few minutes outlasted 20 attempts and took the orchestrator down). Only a broker that
    refuses it for good (credentials, a vhost, a deleted queue), or one never reached
    before the first subscription, ends a consumer.
    """

    prefetch: int = 32
    publish_timeout_s: float = 30.0
    reconnect_attempts: int = 20
    reconnect_backoff_s: float = 0.5
    reconnect_backoff_max_s: float = 10.0
    # Each delay is drawn from [(1 - jitter) * d, d]: processes cut off together must not
    # all come back in the same instant and knock the returning broker over again.
    reconnect_jitter: float = 0.5
    heartbeat_s: int = 30

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before reconnect ``attempt`` (1-based): exponential, capped,
        jittered. The one retry policy of the bus; nothing else loops on transport errors."""
        d = min(self.reconnect_backoff_max_s, self.reconnect_backoff_s * 2 ** max(0, attempt - 1))
        jitter = min(1.0, max(0.0, self.reconnect_jitter))
        return float(d * (1.0 - jitter * random.random()))


# What an AMQP table can carry (pika cannot encode floats); checked on both buses alike.
_HEADER_SCALARS = (str, bytes, int, bool, type(None))


def check_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` if every key is a string and every value an AMQP table value.
    (Over AMQP, bytes that are valid UTF-8 come back as str.)"""

    def ok(value: Any) -> bool:
        if isinstance(value, _HEADER_SCALARS):
            return True
        if isinstance(value, list | tuple):
            return all(ok(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and ok(v) for k, v in value.items())
        return False

    headers = dict(headers or {})
    bad = {k: v for k, v in headers.items() if not (isinstance(k, str) and ok(v))}
    if bad:
        raise BusError(f"header values must be str, bytes, int, bool, None, lists or dicts: {bad}")
    return headers


class Delivery(ABC):
    """One received message. Settle it exactly once: ``ack``, ``requeue`` or ``reject``."""

    def __init__(
        self,
        bus: Bus,
        *,
        body: bytes,
        headers: dict[str, Any] | None,
        exchange: str,
        routing_key: str,
        queue: str,
        redelivered: bool,
        message_id: str | None,
        timestamp: int | None = None,
        user_id: str | None = None,
    ) -> None:
        self.body = body
        self.headers: dict[str, Any] = dict(headers or {})
        self.exchange = exchange
        self.routing_key = routing_key
        self.queue = queue
        self.redelivered = redelivered
        self.message_id = message_id
        self.timestamp = timestamp
        # The broker user that published it, where the broker vouches for it (AMQP's
        # validated user_id); None in process or when the publisher did not say.
        self.user_id = user_id
        self._bus = bus
        self._settled: str | None = None
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        return self._settled is not None

    @property
    def outcome(self) -> str | None:
        """How it was settled: ``ack``, ``requeue``, ``reject`` (dead-lettered with a
        reason) or ``discard``; None while it is not."""
        return self._settled

    def ack(self) -> None:
        """The message is done with; the broker forgets it."""
        self._claim("ack")
        self._ack()

    def settle(self, reason: str | None) -> None:
        """``ack`` when ``reason`` is None, else ``reject(reason)``: a handler's verdict."""
        if reason is None:
            self.ack()
        else:
            self.reject(reason)

    def requeue(self) -> None:
        """Give the message back; it comes again with ``redelivered=True``."""
        self._claim("requeue")
        self._nack(requeue=True)

    def reject(self, reason: str) -> None:
        """Dead-letter the message with ``reason`` in its headers, then ack the original.

        The copy to ``fedmq.dead`` is published (and confirmed) before the ack, so a crash in
        between duplicates the message rather than losing it.
        """
        self._claim("reject")
        headers = dict(self.headers)
        headers.update(
            {
                REASON_HEADER: reason[:MAX_REASON_CHARS],
                ORIGINAL_EXCHANGE_HEADER: self.exchange,
                ORIGINAL_ROUTING_KEY_HEADER: self.routing_key,
                ORIGINAL_QUEUE_HEADER: self.queue,
            }
        )
        try:
            self._bus.publish(
                DEAD_LETTER_EXCHANGE,
                self.routing_key,
                self.body,
                headers=headers,
                message_id=self.message_id,
            )
        except BaseException:
            self._settled = None  # still ours to settle some other way
            raise
        self._ack()

    def _claim(self, how: str) -> None:
        with self._lock:
            if self._settled is not None:
                raise BusError(f"message {self.message_id} already settled ({self._settled})")
            self._settled = how

    def _discard(self) -> None:
        """Last resort when even dead-lettering failed: let the broker drop it (its queue's
        dead-letter exchange still catches it on AMQP)."""
        with self._lock:
            self._settled = "discard"
        self._nack(requeue=False)

    @abstractmethod
    def _ack(self) -> None: ...

    @abstractmethod
    def _nack(self, *, requeue: bool) -> None: ...

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.message_id} {self.exchange}/{self.routing_key} "
            f"from {self.queue} redelivered={self.redelivered}>"
        )


Handler = Callable[[Delivery], None]


@dataclass(frozen=True)
class Outgoing:
    """One message of ``Bus.publish_many`` (persistent, not mandatory)."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None = None
    message_id: str | None = None


BatchHandler = Callable[[list[Delivery]], None]


@dataclass(frozen=True)
class Batching:
    """How a batch consumer groups deliveries (``Bus.consume_batches``).

    A batch is what is waiting when the first message arrives, plus what arrives within
    ``linger_s``, up to ``max_messages`` or ``max_bytes`` of bodies: under load it fills
    from the queue's backlog at no wait; when idle a message waits ``linger_s`` at most.
    The consumer's prefetch bounds it too (the broker sends no more un-acked messages).
    """

    max_messages: int = 64
    max_bytes: int = 16 << 20
    linger_s: float = 0.002

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.linger_s < 0:
            raise ValueError(f"bad batching {self}")

    def full(self, count: int, nbytes: int) -> bool:
        return count >= self.max_messages or nbytes >= self.max_bytes


def run_handler(delivery: Delivery, handler: Handler) -> None:
    """Run ``handler``; a consumer never dies from a bad message.

    A handler that raises gets one more chance (requeue, so it comes back redelivered); on an
    already redelivered message the exception becomes the dead-letter reason. A handler that
    returns without settling keeps the message un-acked: it may settle it later from another
    thread (e.g. after a database commit).
    """
    try:
        handler(delivery)
    except Exception as exc:
        _failed(delivery, exc)


def run_batch_handler(deliveries: list[Delivery], handler: BatchHandler) -> None:
    """Run a batch ``handler``; if it raises, every delivery it left unsettled meets the
    policy of ``run_handler`` on its own (requeued once, then dead-lettered)."""
    try:
        handler(deliveries)
    except Exception as exc:
        for d in deliveries:
            _failed(d, exc)


def _failed(delivery: Delivery, exc: Exception) -> None:
    if delivery.settled:
        log.exception("handler raised after settling %r", delivery)
        return
    try:
        if delivery.redelivered:
            log.warning("handler failed again on %r, dead-lettering: %r", delivery, exc)
            delivery.reject(f"handler error: {exc!r}")
        else:
            log.warning("handler failed on %r, requeueing once: %r", delivery, exc)
            delivery.requeue()
    except Exception:
        log.exception("could not requeue or dead-letter %r; discarding it", delivery)
        try:
            delivery._discard()
        except Exception:
            log.exception("could not discard %r either", delivery)


class Consumer(ABC):
    @abstractmethod
    def stop(self) -> None:
        """Stop consuming; un-acked deliveries go back to the queue (``redelivered=True``)."""

    @property
    @abstractmethod
    def alive(self) -> bool:
        """False once stopped, or once reconnecting gave up."""


class Bus(ABC):
    config: BusConfig

    @abstractmethod
    def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings; idempotent. A queue redeclared with other
        arguments is a ``BusError`` (the broker refuses it too)."""

    @abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> None:
        """Returns once the broker confirmed the message. ``Unroutable`` (a ``BusError``) when
        ``mandatory`` and no queue is bound for the key; ``BusError`` for a missing exchange.
        Pass ``mandatory=False`` for fire-and-forget feeds such as ``fedmq.events``."""

    def publish_many(self, messages: list[Outgoing]) -> None:
        """Publish ``messages`` in order; returns once the broker holds them all (durably,
        as ``publish``). Not mandatory: a message no queue is bound for is dropped. The
        point is one broker round trip for many (the outbox drains in batches); this
        default publishes one at a time."""
        for m in messages:
            self.publish(
                m.exchange,
                m.routing_key,
                m.body,
                headers=m.headers,
                message_id=m.message_id,
                mandatory=False,
            )

    @abstractmethod
    def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int | None = None,
        declare: Topology | None = None,
    ) -> Consumer:
        """Run ``handler`` on the consumer's own thread for each message of ``queue``, at most
        ``prefetch`` un-acked at a time. ``declare`` is declared by the consumer itself first
        (and after each reconnect): exclusive queues need that. A missing queue is a
        ``BusError`` here, not later."""

    @abstractmethod
    def consume_batches(
        self,
        queue: str,
        handler: BatchHandler,
        *,
        batching: Batching,
        prefetch: int | None = None,
        declare: Topology | None = None,
    ) -> Consumer:
        """Like ``consume``, but ``handler`` gets the deliveries in batches (``Batching``),
        in delivery order, and settles each of them (a group commit: one transaction for
        many messages). ``prefetch`` should be at least ``batching.max_messages``."""

    @abstractmethod
    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        """Pull one message, waiting up to ``timeout`` seconds; None if there is none. Settle
        it from the thread that got it (on AMQP other threads' settlements wait for this
        thread's next bus call)."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Drop the ready messages of ``queue``; returns how many."""

    @abstractmethod
    def queue_depth(self, queue: str) -> int:
        """Ready (not un-acked) messages in ``queue``."""

    @abstractmethod
    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its bindings (a device leaving for good); absent is fine."""

    @abstractmethod
    def close(self) -> None:
        """Stop every consumer and close every connection."""

    def health(self) -> list[HealthSnapshot]:
        """How each of the bus's connections is doing (``protocol.bus.health``); an
        in-process bus has none that can fail."""
        return []

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
