"""InProcessBus: the AMQP semantics fedmq relies on, in memory, for embedded mode and tests.

Like dramatiq's ``StubBroker``, but faithful where fedmq's correctness depends on it: direct,
topic (``*``/``#``) and fanout routing, the default exchange, mandatory publishes, prefetch,
ack/requeue with ``redelivered``, un-acked messages returned when a consumer stops, auto-delete
queues, dead-lettering with the same headers. Thread-safe: one lock guards all state;
handlers run on one thread per consumer, outside the lock. Each queue has a condition of its
own on that lock, so a message wakes only the threads waiting on its queue: with one shared
condition every publish woke every waiter, and an embedded federation of 1,000 devices spent
its rounds waking threads that had nothing to do.

Deliberate differences from RabbitMQ: nothing survives the process (``persistent`` is
ignored), and ``exclusive`` queues are not tied to a connection (there is none); they are
deleted when their last consumer stops, like auto-delete queues.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from protocol.bus.base import (
    BatchHandler,
    Batching,
    Bus,
    BusConfig,
    Consumer,
    Delivery,
    Handler,
    check_headers,
    run_batch_handler,
    run_handler,
)
from protocol.bus.errors import BusError, Unroutable
from protocol.topology import Exchange, Queue, Topology, topic_matches

log = logging.getLogger(__name__)

_STOP_JOIN_S = 30.0


@dataclass
class _Message:
    body: bytes
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    message_id: str
    timestamp: int
    redelivered: bool = False


@dataclass
class _Queue:
    spec: Queue
    ready: deque[_Message] = field(default_factory=deque)
    consumers: int = 0


@dataclass
class _Channel:
    """Who holds which un-acked messages: a consumer, or the bus itself for ``get``."""

    unacked: dict[int, tuple[str, _Message]] = field(default_factory=dict)


@dataclass
class _Routes:
    """One exchange's bindings, indexed for routing."""

    every: dict[str, None] = field(default_factory=dict)  # bound queues (a fanout's targets)
    exact: dict[str, list[str]] = field(default_factory=dict)  # key without wildcards
    patterns: list[tuple[str, str]] = field(default_factory=list)  # (queue, topic pattern)


class _MemoryDelivery(Delivery):
    def __init__(self, bus: InProcessBus, channel: _Channel, tag: int, queue: str, m: _Message):
        super().__init__(
            bus,
            body=m.body,
            headers=m.headers,
            exchange=m.exchange,
            routing_key=m.routing_key,
            queue=queue,
            redelivered=m.redelivered,
            message_id=m.message_id,
            timestamp=m.timestamp,
        )
        self._memory_bus = bus
        self._channel = channel
        self._tag = tag

    def _ack(self) -> None:
        self._memory_bus._settle(self._channel, self._tag, requeue=None)

    def _nack(self, *, requeue: bool) -> None:
        self._memory_bus._settle(self._channel, self._tag, requeue=requeue)


class _MemoryConsumer(Consumer):
    def __init__(
        self,
        bus: InProcessBus,
        queue: str,
        handler: Handler | BatchHandler,
        prefetch: int,
        batching: Batching | None = None,
    ) -> None:
        # With ``batching`` the handler takes a list of deliveries (a BatchHandler).
        self._bus, self._queue, self._handler, self._prefetch = bus, queue, handler, prefetch
        self._batching = batching
        self._channel = _Channel()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"fedmq-consumer-{queue}", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        with self._bus._lock:
            self._stopping = True
            self._bus._wake(self._queue)
        if threading.current_thread() is not self._thread:
            self._thread.join(_STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("consumer of %s: handler still running after stop", self._queue)

    def _next(self, deadline: float | None = None) -> tuple[int, _Message] | None:
        """The next message; waits for one (until ``deadline``, if given: then None)."""
        with self._bus._lock:
            while not self._stopping:
                q = self._bus._queues.get(self._queue)
                room = self._prefetch == 0 or len(self._channel.unacked) < self._prefetch
                if q is not None and q.ready and room:
                    m = q.ready.popleft()
                    tag = next(self._bus._tags)
                    self._channel.unacked[tag] = (self._queue, m)
                    return tag, m
                # Fetched each pass: a deleted queue's condition is replaced by a new one.
                cond = self._bus._waiters(self._queue)
                if deadline is None:
                    cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    cond.wait(left)
            return None

    def _delivery(self, item: tuple[int, _Message]) -> _MemoryDelivery:
        return _MemoryDelivery(self._bus, self._channel, item[0], self._queue, item[1])

    def _run(self) -> None:
        try:
            while (item := self._next()) is not None:
                if self._batching is None:
                    run_handler(self._delivery(item), self._handler)  # type: ignore[arg-type]
                    continue
                batch = [self._delivery(item)]
                nbytes = len(batch[0].body)
                deadline = time.monotonic() + self._batching.linger_s
                while not self._batching.full(len(batch), nbytes):
                    more = self._next(deadline)
                    if more is None:
                        break
                    batch.append(self._delivery(more))
                    nbytes += len(batch[-1].body)
                run_batch_handler(batch, self._handler)  # type: ignore[arg-type]
        finally:
            self._bus._consumer_gone(self, self._channel)


class InProcessBus(Bus):
    _registry: ClassVar[dict[str, InProcessBus]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: BusConfig | None = None, *, name: str | None = None) -> None:
        self.config = config or BusConfig()
        self.name = name
        self._lock = threading.RLock()
        self._conds: dict[str, threading.Condition] = {}
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        # The bindings, by queue (exchange, key) and by exchange indexed for routing.
        self._by_queue: dict[str, set[tuple[str, str]]] = {}
        self._by_exchange: dict[str, _Routes] = {}
        self._consumers: set[_MemoryConsumer] = set()
        self._get_channel = _Channel()
        self._tags = itertools.count(1)
        self._closed = False

    @classmethod
    def named(cls, name: str, config: BusConfig | None = None) -> InProcessBus:
        """The process-wide bus called ``name``, so that components of one process share it."""
        with cls._registry_lock:
            bus = cls._registry.get(name)
            if bus is None:
                bus = cls._registry[name] = cls(config, name=name)
            return bus

    def declare(self, topology: Topology) -> None:
        with self._lock:
            self._check_open()
            for ex in topology.exchanges:
                known = self._exchanges.setdefault(ex.name, ex)
                if known != ex:
                    raise BusError(f"exchange {ex.name!r} exists as {known}, not {ex}")
            for spec in topology.queues:
                q = self._queues.setdefault(spec.name, _Queue(spec))
                # A bounded queue that exists without (or with other) bounds is used as it
                # is, as AmqpBus does with an older deployment's queue.
                same = q.spec.unbounded() == spec.unbounded() if spec.bounded else q.spec == spec
                if not same:
                    raise BusError(f"queue {spec.name!r} exists as {q.spec}, not {spec}")
            for b in topology.bindings:
                if b.exchange not in self._exchanges:
                    raise BusError(f"no exchange {b.exchange!r} to bind {b.queue!r} to")
                if b.queue not in self._queues:
                    raise BusError(f"no queue {b.queue!r} to bind to {b.exchange!r}")
                self._bind(b.exchange, b.queue, b.routing_key)

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
        m = _Message(
            bytes(body),
            check_headers(headers),
            exchange,
            routing_key,
            message_id or uuid.uuid4().hex,
            int(time.time()),
        )
        with self._lock:
            self._check_open()
            targets = self._route(exchange, routing_key)
            if not targets and mandatory:
                raise Unroutable(f"no queue bound to {exchange!r} for {routing_key!r}")
            for name in targets:
                q = self._queues[name]
                q.ready.append(replace(m))
                # x-max-length's drop-head (dead-letters); expiry and TTL are not kept in
                # memory: this bus lives no longer than its process.
                limit = q.spec.max_length
                while limit is not None and len(q.ready) > limit:
                    q.ready.popleft()
                self._wake(name)

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":  # AMQP's default exchange: the key names the queue
            return [routing_key] if routing_key in self._queues else []
        ex = self._exchanges.get(exchange)
        if ex is None:
            raise BusError(f"no exchange {exchange!r}")
        routes = self._by_exchange.get(exchange)
        if routes is None:
            return []
        if ex.type == "fanout":
            return sorted(routes.every)
        found = set(routes.exact.get(routing_key, ()))
        if ex.type == "topic":
            found.update(q for q, key in routes.patterns if topic_matches(key, routing_key))
        return sorted(found)

    def _bind(self, exchange: str, queue: str, key: str) -> None:
        """Add a binding (called with the lock held). A key without wildcards is indexed
        for lookup, so routing one device's notice does not match it against every other
        device's binding (and a direct exchange's keys are all exact)."""
        bound = self._by_queue.setdefault(queue, set())
        if (exchange, key) in bound:
            return
        bound.add((exchange, key))
        routes = self._by_exchange.setdefault(exchange, _Routes())
        routes.every[queue] = None
        routes.exact.setdefault(key, []).append(queue)
        if {"*", "#"} & set(key.split(".")):
            routes.patterns.append((queue, key))

    def _unbind_queue(self, queue: str) -> None:
        """Drop every binding of ``queue`` and its waiters' condition, after waking them
        (called with the lock held): a fleet's queues come and go, their state must not stay."""
        self._wake(queue)
        self._conds.pop(queue, None)
        for exchange, key in self._by_queue.pop(queue, ()):
            routes = self._by_exchange[exchange]
            routes.every.pop(queue, None)
            targets = routes.exact.get(key, [])
            if queue in targets:
                targets.remove(queue)
            if not targets:
                routes.exact.pop(key, None)
            routes.patterns = [p for p in routes.patterns if p[0] != queue]

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
        if declare is not None:
            self.declare(declare)
        with self._lock:
            self._check_open()
            self._queue(queue).consumers += 1
            prefetch = self.config.prefetch if prefetch is None else prefetch
            consumer = _MemoryConsumer(self, queue, handler, prefetch, batching)
            self._consumers.add(consumer)
            return consumer

    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                self._check_open()
                q = self._queue(queue)
                if q.ready:
                    m = q.ready.popleft()
                    tag = next(self._tags)
                    self._get_channel.unacked[tag] = (queue, m)
                    return _MemoryDelivery(self, self._get_channel, tag, queue, m)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._waiters(queue).wait(left)

    def purge(self, queue: str) -> int:
        with self._lock:
            q = self._queue(queue)
            count = len(q.ready)
            q.ready.clear()
            return count

    def queue_depth(self, queue: str) -> int:
        with self._lock:
            return len(self._queue(queue).ready)

    def delete_queue(self, queue: str) -> None:
        with self._lock:
            self._check_open()
            self._queues.pop(queue, None)
            self._unbind_queue(queue)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            consumers = list(self._consumers)
            for cond in self._conds.values():
                cond.notify_all()
        for c in consumers:
            c.stop()
        with self._registry_lock:
            if self.name is not None and self._registry.get(self.name) is self:
                del self._registry[self.name]

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            raise BusError(f"no queue {name!r}")
        return q

    def _waiters(self, queue: str) -> threading.Condition:
        """The condition that threads waiting on ``queue`` wait on (on the bus's lock)."""
        cond = self._conds.get(queue)
        if cond is None:
            with self._lock:
                cond = self._conds.setdefault(queue, threading.Condition(self._lock))
        return cond

    def _wake(self, queue: str) -> None:
        """Wake whoever waits on ``queue`` (called with the lock held)."""
        cond = self._conds.get(queue)
        if cond is not None:
            cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("bus is closed")

    def _settle(self, channel: _Channel, tag: int, *, requeue: bool | None) -> None:
        with self._lock:
            entry = channel.unacked.pop(tag, None)
            if entry is None:
                # Its consumer stopped and the message went back to the queue already.
                log.warning("settling delivery %d that is no longer held; ignored", tag)
                return
            queue, m = entry
            q = self._queues.get(queue)
            if requeue and q is not None:
                q.ready.appendleft(replace(m, redelivered=True))
            elif requeue is False and q is not None and q.spec.dead_letter_exchange:
                self._dead_letter(q.spec.dead_letter_exchange, queue, m)
            # The settled message frees a prefetch slot for this queue's consumers.
            self._wake(queue)

    def _dead_letter(self, exchange: str, queue: str, m: _Message) -> None:
        """What the broker does for a queue's x-dead-letter-exchange on a nack without requeue:
        the message moves on (with x-first-death-* headers), or is dropped if nothing binds."""
        headers = {**m.headers, "x-first-death-queue": queue, "x-first-death-reason": "rejected"}
        try:
            targets = self._route(exchange, m.routing_key)
        except BusError:
            targets = []
        for name in targets:
            self._queues[name].ready.append(replace(m, headers=dict(headers)))
            self._wake(name)

    def _consumer_gone(self, consumer: _MemoryConsumer, channel: _Channel) -> None:
        with self._lock:
            self._consumers.discard(consumer)
            returned: dict[str, list[_Message]] = {}
            for queue, m in channel.unacked.values():
                returned.setdefault(queue, []).append(replace(m, redelivered=True))
            channel.unacked.clear()
            for queue, msgs in returned.items():
                if (q := self._queues.get(queue)) is not None:
                    q.ready.extendleft(reversed(msgs))
                    self._wake(queue)
            q = self._queues.get(consumer._queue)
            if q is not None:
                q.consumers -= 1
                if q.consumers == 0 and (q.spec.auto_delete or q.spec.exclusive):
                    del self._queues[q.spec.name]
                    self._unbind_queue(q.spec.name)
