"""AmqpBus: the Bus on RabbitMQ through pika, the only module of fedmq that imports pika.

pika's ``BlockingConnection`` is not thread-safe, so connections are never shared across
threads: each thread that publishes (or declares, gets, purges) has its own connection, kept
in a thread-local, and each consumer has its own connection and thread. Settling a delivery
from another thread goes through ``add_callback_threadsafe`` of the connection that owns it.

Publishes are persistent, mandatory and confirmed. A lost connection is re-established with
the one backoff policy of ``BusConfig.backoff`` (capped, jittered): a call (publish, get,
declare) for a bounded number of attempts, then ``ConnectionLost``; a consumer for as long
as it is not stopped. A publish cut off before its confirm is sent again, so delivery is
at-least-once. Each failed attempt is one WARNING line (the traceback only at DEBUG), and
every connection's state is in ``AmqpBus.health()``. An idle publishing connection misses
heartbeats (pika only answers them inside a call) and the broker may drop it; the next call
then simply reconnects. A handler that runs longer than about two heartbeats loses its
consumer's connection, and its message comes back.
A thread's connection lives until ``close()``: publish from long-lived threads (pools), not
from a new thread per message.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions as px
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils as _pika_io

from protocol.bus.base import (
    BatchHandler,
    Batching,
    Bus,
    BusConfig,
    Consumer,
    Delivery,
    Handler,
    Outgoing,
    check_headers,
    run_batch_handler,
    run_handler,
)
from protocol.bus.errors import BusError, ConnectionLost, Unroutable
from protocol.bus.health import HealthSnapshot, LinkHealth, describe
from protocol.topology import Topology

log = logging.getLogger(__name__)
T = TypeVar("T")

# pika logs every failed connection attempt as several ERROR lines and a traceback (819
# lines in one outage, issue 17), though the bus handles the failure and says so in one
# line itself. Quiet unless someone set pika's level on purpose (DEBUG shows it all again).
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)

# pika reads its socket 4 KiB at a time and appends each read to its frame buffer (a bytes
# concatenation, which copies the buffer), so a 1 MB update took 256 trips through its
# event loop and about 17 MB of copying: 2.5 ms of the consumer's CPU, against 1.4 ms with
# reads of one whole frame (RabbitMQ's default frame_max, 128 KiB), consuming 200 messages
# of 1 MiB; 550-byte messages cost the same either way. It is a class attribute of pika's
# transport, with no public setting.
RECV_BYTES = 128 << 10
_pika_io._AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES


class _Cancelled(Exception):
    """The broker cancelled a consumer; subscribing again tells whether the queue is gone."""


# Not worth retrying: wrong credentials, a vhost we may not use. (Not pika's
# IncompatibleProtocolError: it is also what a connection reset during the handshake raises,
# as by a broker that is starting or stopping, or a proxy in front of one that is away.)
_FATAL = (
    px.ProbableAuthenticationError,
    px.ProbableAccessDeniedError,
    px.AuthenticationError,
)
_TRANSIENT = (px.AMQPConnectionError, px.ChannelWrongStateError, OSError, _Cancelled)
_POLL_S = 0.1


def _broker_said(e: px.ChannelClosedByBroker) -> str:
    return f"({e.reply_code}) {e.reply_text}"


_PRECONDITION_FAILED = 406
_warned_unbounded: set[str] = set()


def _declare_on(
    channel: BlockingChannel, topology: Topology, reopen: Callable[[], BlockingChannel]
) -> BlockingChannel:
    """Declare ``topology``; returns the channel to go on with (``reopen``'s, when the broker
    closed the first one).

    A bounded queue (``Queue.bounded``) that exists with other arguments, one declared
    before its bounds existed, is refused by the broker (PRECONDITION_FAILED, which closes
    the channel): it is then used as it is, with a warning once per queue, instead of
    failing every device and the orchestrator of an upgraded deployment. Its bounds come
    from the broker's operator policies then (deploy/rabbitmq, docs/reliability.md)."""
    for ex in topology.exchanges:
        channel.exchange_declare(ex.name, ex.type, durable=ex.durable)
    for q in topology.queues:
        try:
            channel.queue_declare(
                q.name,
                durable=q.durable,
                exclusive=q.exclusive,
                auto_delete=q.auto_delete,
                arguments=q.arguments or None,
            )
        except px.ChannelClosedByBroker as e:
            if e.reply_code != _PRECONDITION_FAILED or not q.bounded:
                raise
            channel = reopen()
            channel.queue_declare(q.name, passive=True)
            if q.name not in _warned_unbounded:
                _warned_unbounded.add(q.name)
                log.warning(
                    "queue %r exists with other arguments than %s (%s): using it as it is; "
                    "bound it with the broker's operator policy (docs/reliability.md)",
                    q.name,
                    q.arguments,
                    e.reply_text,
                )
    for b in topology.bindings:
        channel.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)
    return channel


def _connect(params: pika.URLParameters) -> pika.BlockingConnection:
    """A new connection; whatever making it raises is a connection error. pika raises a
    bare ValueError ("Expected connected socket, but getpeername() failed") when the socket
    is reset between connecting and its first use: it killed a consumer's thread in the
    broker-outage test."""
    try:
        return pika.BlockingConnection(params)
    except (px.AMQPError, OSError):
        raise
    except Exception as e:
        raise px.AMQPConnectionError(e) from e


def _close_quietly(connection: pika.BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # already gone is as good as closed
        pass


class _Link:
    """One thread's connection, its confirmed channel and (once asked for) a transactional
    one for batches."""

    def __init__(self, params: pika.URLParameters) -> None:
        self.connection = _connect(params)
        self.channel = self._open_channel()
        self._tx: BlockingChannel | None = None

    def tx_channel(self) -> BlockingChannel:
        if self._tx is None or not self._tx.is_open:
            self._tx = self.connection.channel()
            self._tx.tx_select()
        return self._tx

    def _open_channel(self) -> BlockingChannel:
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def ready_channel(self) -> BlockingChannel:
        if not self.channel.is_open:  # the broker closed it (404 ...); the connection lives
            self.channel = self._open_channel()
        return self.channel

    def close(self) -> None:
        _close_quietly(self.connection)


class _AmqpDelivery(Delivery):
    def __init__(
        self,
        bus: AmqpBus,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        queue: str,
        method: Any,
        props: Any,
        body: bytes,
    ):
        super().__init__(
            bus,
            body=body,
            headers=props.headers,
            exchange=method.exchange,
            routing_key=method.routing_key,
            queue=queue,
            redelivered=method.redelivered,
            message_id=props.message_id,
            timestamp=props.timestamp,
            user_id=props.user_id,
        )
        self._connection, self._channel = connection, channel
        self._tag, self._owner = method.delivery_tag, threading.get_ident()
        # Set while this delivery's batch runs: acks on the consumer's thread are gathered
        # and sent as one (``_AckBuffer.flush``).
        self._acks: _AckBuffer | None = None

    def _ack(self) -> None:
        acks = self._acks
        if acks is not None and acks.open and threading.get_ident() == self._owner:
            acks.tags.append(self._tag)
            return
        self._on_owner(lambda: self._channel.basic_ack(self._tag))

    def _nack(self, *, requeue: bool) -> None:
        self._on_owner(lambda: self._channel.basic_nack(self._tag, requeue=requeue))

    def _on_owner(self, settle: Callable[[], None]) -> None:
        def run() -> None:
            # A delivery tag is only valid on the channel that delivered it; after a reconnect
            # the broker has already put the message back, so there is nothing left to settle.
            if not self._channel.is_open:
                log.warning("channel of %r is gone; the broker redelivers it", self)
                return
            try:
                settle()
            except px.AMQPError as e:
                log.warning("could not settle %r (%r); the broker redelivers it", self, e)

        if threading.get_ident() == self._owner:
            run()
            return
        try:
            self._connection.add_callback_threadsafe(run)
        except px.AMQPError as e:
            log.warning("could not settle %r (%r); the broker redelivers it", self, e)


class _AckBuffer:
    """The acks of one batch, sent together once its handler returns: one ``basic_ack``
    with ``multiple`` (one frame, one socket write) instead of one per message, which was a
    seventh of an ingest consumer's time."""

    def __init__(self, batch: list[_AmqpDelivery]) -> None:
        self.batch, self.tags, self.open = batch, list[int](), True
        for d in batch:
            d._acks = self

    def flush(self, channel: BlockingChannel, earlier: list[_AmqpDelivery]) -> None:
        """Send the gathered acks. ``earlier``: deliveries of earlier batches of this
        channel that their handler left unsettled (kept up to date here)."""
        self.open = False
        earlier[:] = [d for d in earlier if not d.settled]
        unsettled = [d for d in self.batch if not d.settled]
        if not self.tags:
            earlier.extend(unsettled)
            return
        if not channel.is_open:
            log.warning("channel gone before %d acks; the broker redelivers", len(self.tags))
            return
        last = max(self.tags)
        try:
            if not unsettled and all(d._tag > last for d in earlier):
                # Every message of this channel up to the batch's last tag is then in the
                # batch (a batch takes all that was pending) and settled: those not acked
                # here were nacked already, so ``multiple`` acks exactly the gathered ones.
                channel.basic_ack(last, multiple=True)
            else:
                for tag in self.tags:
                    channel.basic_ack(tag)
        except px.AMQPError as e:
            log.warning("could not send %d acks (%r); the broker redelivers", len(self.tags), e)
        earlier.extend(unsettled)


class _AmqpConsumer(Consumer):
    """A thread with its own connection; it reconnects and re-subscribes after a loss."""

    def __init__(
        self,
        bus: AmqpBus,
        queue: str,
        handler: Handler | BatchHandler,
        prefetch: int,
        declare: Topology | None,
        batching: Batching | None = None,
    ) -> None:
        # With ``batching`` the handler takes a list of deliveries (a BatchHandler).
        self._bus, self._queue, self._handler, self._batching = bus, queue, handler, batching
        self._prefetch, self._declare = prefetch, declare
        self._stopping, self._subscribed = threading.Event(), threading.Event()
        self.error: BusError | None = None
        self.health = LinkHealth(f"consumer {queue}")
        self._fresh = False  # subscribed since the last failure
        self._thread = threading.Thread(
            target=self._run, name=f"fedmq-consumer-{queue}", daemon=True
        )
        self._thread.start()
        self._subscribed.wait()  # set on the first subscription and on giving up
        if self.error is not None:
            raise self.error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop consuming. Bounded: a consumer in the middle of connecting to a broker that
        does not answer is left to its socket timeout (a daemon thread, gone at exit)."""
        self._stopping.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.health.stopped()

    def _run(self) -> None:
        try:
            self._consume_until_stopped()
        finally:
            self._bus._release_thread_link()

    def _consume_until_stopped(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._session()
                return
            except _FATAL as e:
                return self._give_up(BusError(f"consumer of {self._queue!r}: {e!r}"))
            except px.ChannelClosedByBroker as e:
                # Before the first subscription this is a missing queue or a bad declaration.
                if not self._subscribed.is_set() or e.reply_code in (403, 404, 405):
                    return self._give_up(
                        BusError(f"consumer of {self._queue!r}: {_broker_said(e)}")
                    )
                err: Exception = e
            except _TRANSIENT as e:
                err = e
            except Exception as e:  # pika's own bugs included: a consumer must not die of one
                log.error("consumer of %s: unexpected %s", self._queue, describe(e))
                err = e
            if self._stopping.is_set():
                return
            if self._fresh:  # it was subscribed again: count failures in a row only
                failures, self._fresh = 0, False
            failures += 1
            self.health.down(err)
            # Never subscribed: a wrong URL looks like a broker that is down, and the caller
            # waits in ``consume``; give it an answer. Once subscribed, never give up.
            if not self._subscribed.is_set() and failures > self._bus.config.reconnect_attempts:
                return self._give_up(
                    ConnectionLost(f"consumer of {self._queue!r} gave up after {err!r}")
                )
            delay = self._bus.config.backoff(failures)
            log.warning(
                "consumer of %s: connection lost (%s); reconnect attempt %d in %.1f s",
                self._queue,
                describe(err),
                failures,
                delay,
            )
            log.debug("consumer of %s: connection lost", self._queue, exc_info=err)
            self._stopping.wait(delay)

    @staticmethod
    def _fill(
        connection: pika.BlockingConnection, pending: list[_AmqpDelivery], batching: Batching
    ) -> None:
        """Take in what arrives within the linger time, until the batch is full. Each call
        dispatches every message pika has already read, so a backlog fills it at once."""
        deadline = time.monotonic() + batching.linger_s
        while not batching.full(len(pending), sum(len(d.body) for d in pending)):
            left = deadline - time.monotonic()
            before = len(pending)
            connection.process_data_events(time_limit=max(0.0, left))
            if len(pending) == before and left <= 0:
                return

    def _give_up(self, error: BusError) -> None:
        log.error("%s", error)
        self.health.failed(error)
        self.error = error
        self._subscribed.set()

    def _session(self) -> None:
        connection = _connect(self._bus._params)
        try:
            channel = connection.channel()
            if self._declare is not None:
                channel = _declare_on(channel, self._declare, connection.channel)
            channel.basic_qos(prefetch_count=self._prefetch)

            pending: list[_AmqpDelivery] = []
            left_unsettled: list[_AmqpDelivery] = []

            def on_message(ch: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
                delivery = _AmqpDelivery(
                    self._bus, connection, ch, self._queue, method, props, body
                )
                if self._batching is None:
                    run_handler(delivery, self._handler)  # type: ignore[arg-type]
                else:
                    pending.append(delivery)

            channel.basic_consume(self._queue, on_message, auto_ack=False)
            self._fresh = True
            self.health.up()
            if self._subscribed.is_set():
                log.warning("consumer of %s: subscribed again", self._queue)
            self._subscribed.set()
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=_POLL_S)
                if pending:
                    assert self._batching is not None
                    self._fill(connection, pending, self._batching)
                    batch = pending[:]
                    pending.clear()
                    acks = _AckBuffer(batch)
                    try:
                        run_batch_handler(list(batch), self._handler)  # type: ignore[arg-type]
                    finally:
                        acks.flush(channel, left_unsettled)
                if not channel.consumer_tags:  # the broker cancelled us: the queue was deleted
                    raise _Cancelled(f"the broker cancelled the consumer of {self._queue!r}")
        finally:
            # Closing returns every un-acked message to the queue, marked redelivered.
            _close_quietly(connection)


class AmqpBus(Bus):
    def __init__(self, url: str, config: BusConfig | None = None) -> None:
        self.config = config or BusConfig()
        self._params = pika.URLParameters(url)
        self._params.heartbeat = self.config.heartbeat_s
        # A broker under a resource alarm blocks publishers; give up instead of hanging.
        self._params.blocked_connection_timeout = self.config.publish_timeout_s
        self._params.connection_attempts = 1  # retries are ours (BusConfig.backoff)
        # Stamped on every publish: the broker refuses a user_id other than the connection's
        # own, so a consumer can tell which broker user sent a message (registration limits
        # per source, protocol/limits.py). None under EXTERNAL (certificate) login.
        self._user_id: str | None = getattr(self._params.credentials, "username", None) or None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._consumers: set[_AmqpConsumer] = set()
        self._closed = False
        self._closing = threading.Event()  # wakes calls waiting to reconnect
        # The calls' connections, all threads together: they come and go with the threads.
        self._calls_health = LinkHealth("calls")

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None or not link.connection.is_open:
            if link is not None:
                self._drop(link)
            link = _Link(self._params)
            self._local.link = link
            with self._lock:
                self._links.add(link)
        return link

    def _drop(self, link: _Link) -> None:
        link.close()
        self._local.link = None
        with self._lock:
            self._links.discard(link)

    def _release_thread_link(self) -> None:
        """Close the calling thread's link, e.g. when a consumer thread that dead-lettered
        messages ends; otherwise every consumer ever started would keep a connection."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            self._drop(link)

    def _call(self, what: str, fn: Callable[[_Link], T]) -> T:
        """Run ``fn`` on this thread's link; reconnect and retry on transport errors."""
        attempt = 0
        while True:
            if self._closed:
                raise BusError("bus is closed")
            link: _Link | None = None
            try:
                link = self._link()
                link.ready_channel()
                result = fn(link)
                self._calls_health.up()
                return result
            except px.UnroutableError:
                raise Unroutable(f"{what}: no queue bound for it") from None
            except px.NackError:
                raise BusError(f"{what}: the broker refused it (nack)") from None
            except px.ChannelClosedByBroker as e:
                raise BusError(f"{what}: {_broker_said(e)}") from None
            except _FATAL as e:
                raise BusError(f"{what}: {e!r}") from None
            except px.ConnectionBlockedTimeout:
                # A resource alarm outlasted publish_timeout_s; retrying would only wait more.
                if link is not None:
                    self._drop(link)
                raise BusError(f"{what}: the broker blocked it (resource alarm)") from None
            except _TRANSIENT as e:
                if link is not None:
                    self._drop(link)
                attempt += 1
                self._calls_health.down(e)
                if attempt > self.config.reconnect_attempts:
                    raise ConnectionLost(
                        f"{what}: gave up after {attempt} attempts: {describe(e)}"
                    ) from None
                delay = self.config.backoff(attempt)
                log.warning(
                    "%s: connection lost (%s); retry %d in %.1f s",
                    *(what, describe(e), attempt, delay),
                )
                log.debug("%s: connection lost", what, exc_info=e)
                self._closing.wait(delay)
            except px.AMQPError as e:  # e.g. a header value AMQP cannot encode
                raise BusError(f"{what}: {e!r}") from None

    def declare(self, topology: Topology) -> None:
        self._call("declare", lambda link: _declare_on(link.channel, topology, link.ready_channel))

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
        props = pika.BasicProperties(
            delivery_mode=2 if persistent else 1,  # 2: written to disk by the broker
            message_id=message_id or uuid.uuid4().hex,
            timestamp=int(time.time()),
            headers=check_headers(headers) or None,
            user_id=self._user_id,
        )
        self._call(
            f"publish to {exchange!r} with key {routing_key!r}",
            lambda link: link.channel.basic_publish(
                exchange, routing_key, body, props, mandatory=mandatory
            ),
        )

    def publish_many(self, messages: list[Outgoing]) -> None:
        """In one AMQP transaction: ``tx.commit-ok`` comes once the broker routed (and, for
        persistent messages to durable queues, stored) every one of them, as a confirm
        does for one, at one round trip for the lot. A connection lost before the commit
        sends the whole batch again (at-least-once, as ``publish``)."""
        if not messages:
            return
        now = int(time.time())

        def send(link: _Link) -> None:
            channel = link.tx_channel()
            # The blocking channel's basic_publish flushes the socket after every message
            # (a write and a poll each, three quarters of a publish's CPU); its underlying
            # channel only queues the frames, and tx_commit flushes them all at once.
            queue_frames = channel._impl.basic_publish
            for m in messages:
                props = pika.BasicProperties(
                    delivery_mode=2,
                    message_id=m.message_id or uuid.uuid4().hex,
                    timestamp=now,
                    headers=check_headers(m.headers) or None,
                    user_id=self._user_id,
                )
                queue_frames(m.exchange, m.routing_key, m.body, props)
            channel.tx_commit()

        self._call(f"publish {len(messages)} messages", send)

    def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int | None = None,
        declare: Topology | None = None,
    ) -> Consumer:
        return self._subscribe(queue, handler, prefetch, declare, None)

    def consume_batches(
        self,
        queue: str,
        handler: BatchHandler,
        *,
        batching: Batching,
        prefetch: int | None = None,
        declare: Topology | None = None,
    ) -> Consumer:
        return self._subscribe(queue, handler, prefetch, declare, batching)

    def _subscribe(
        self,
        queue: str,
        handler: Handler | BatchHandler,
        prefetch: int | None,
        declare: Topology | None,
        batching: Batching | None,
    ) -> Consumer:
        if self._closed:
            raise BusError("bus is closed")
        prefetch = self.config.prefetch if prefetch is None else prefetch
        consumer = _AmqpConsumer(self, queue, handler, prefetch, declare, batching)
        with self._lock:
            self._consumers.add(consumer)  # so that close() stops it
        return consumer

    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        deadline = time.monotonic() + timeout

        def pull(link: _Link) -> Delivery | None:
            while True:
                method, props, body = link.channel.basic_get(queue, auto_ack=False)
                if method is not None:
                    return _AmqpDelivery(
                        self, link.connection, link.channel, queue, method, props, body
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                # Sleeping through pika keeps the connection's heartbeats answered.
                link.connection.sleep(min(_POLL_S, left))

        return self._call(f"get from {queue!r}", pull)

    def purge(self, queue: str) -> int:
        ok = self._call(f"purge {queue!r}", lambda link: link.channel.queue_purge(queue))
        return int(ok.method.message_count)

    def queue_depth(self, queue: str) -> int:
        ok = self._call(
            f"depth of {queue!r}", lambda link: link.channel.queue_declare(queue, passive=True)
        )
        return int(ok.method.message_count)

    def delete_queue(self, queue: str) -> None:
        self._call(f"delete {queue!r}", lambda link: link.channel.queue_delete(queue))

    def health(self) -> list[HealthSnapshot]:
        with self._lock:
            consumers = list(self._consumers)
        return [self._calls_health.snapshot(), *(c.health.snapshot() for c in consumers)]

    def close(self) -> None:
        self._closed = True
        self._closing.set()
        with self._lock:
            consumers, self._consumers = list(self._consumers), set()
            links, self._links = list(self._links), set()
        for consumer in consumers:
            consumer.stop()
        # Other threads' links are closed from here: they may be idle or gone, never in use,
        # since the bus is closed to new calls.
        for link in links:
            link.close()
