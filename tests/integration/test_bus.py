"""One suite, two buses: every test runs on InProcessBus and on AmqpBus against real RabbitMQ
(Flower's linkstate_test habit), so the in-process bus cannot drift from the broker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

import pytest

from protocol import topology as t
from protocol.bus import (
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    Batching,
    Bus,
    BusConfig,
    BusError,
    Delivery,
    InProcessBus,
    Outgoing,
    Unroutable,
    connect,
)
from protocol.chunking import Reassembler, from_message, iter_chunks, to_headers

pytestmark = pytest.mark.timeout(60)

# Short backoffs keep the reconnect test fast; a real deployment uses the defaults.
FAST = BusConfig(reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.5, reconnect_attempts=40)
WAIT_S = 20.0
KEY = t.update_routing_key("run1", 1, "client1")


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.integration)])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "memory":
        made: Bus = InProcessBus(FAST)
    else:
        made = connect(str(request.getfixturevalue("amqp_url")), FAST)
    yield made
    made.close()


@pytest.fixture
def orchestrator_bus(bus: Bus) -> Bus:
    t.declare(bus)
    return bus


class Inbox:
    """Collects deliveries from a consumer thread; ``wait`` blocks until enough arrived."""

    def __init__(self, then: Callable[[Delivery], None] | None = Delivery.ack) -> None:
        self.deliveries: list[Delivery] = []
        self._then = then
        self._cond = threading.Condition()

    def __call__(self, delivery: Delivery) -> None:
        with self._cond:
            self.deliveries.append(delivery)
            self._cond.notify_all()
        if self._then is not None:
            self._then(delivery)

    def wait(self, count: int) -> list[Delivery]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.deliveries) >= count, WAIT_S), (
                f"got {len(self.deliveries)} of {count} deliveries"
            )
            return list(self.deliveries)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def test_declaring_the_topology_twice_is_harmless(bus: Bus) -> None:
    for _ in range(2):
        t.declare(bus)
        t.declare_device(bus, "dev1", "run1")
    bus.publish(t.DEVICES_EXCHANGE, t.device_routing_key("dev1"), b"to dev1")
    bus.publish(t.DEVICES_EXCHANGE, t.broadcast_routing_key("run1"), b"to run1")
    assert bus.queue_depth(t.device_queue("dev1")) == 2


def test_redeclaring_a_queue_with_other_arguments_is_an_error(bus: Bus) -> None:
    t.declare(bus)
    with pytest.raises(BusError):
        bus.declare(t.Topology(queues=(t.Queue(t.UPDATES_QUEUE, dead_letter_exchange=None),)))


def test_a_64_mib_blob_crosses_the_bus_in_4_mib_chunks_bit_exact(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    blob = os.urandom(64 * 1024 * 1024)
    want = hashlib.sha256(blob).hexdigest()
    reassembler = Reassembler()
    done = threading.Event()
    got: dict[str, object] = {}

    def ingest(delivery: Delivery) -> None:
        whole = reassembler.add(from_message(delivery.headers, delivery.body))
        # Acked as soon as buffered to keep memory low; a durable ingest would ack after storing.
        delivery.ack()
        if whole is not None:
            got.update(size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
            done.set()

    consumer = bus.consume(t.UPDATES_QUEUE, ingest, prefetch=4)
    chunks = 0
    for chunk in iter_chunks(blob, 4 * 1024 * 1024):
        bus.publish(t.UPDATES_EXCHANGE, KEY, chunk.data, headers=to_headers(chunk))
        chunks += 1
    del blob
    assert done.wait(WAIT_S)
    consumer.stop()
    assert chunks == 16
    assert got == {"size": 64 * 1024 * 1024, "sha256": want}
    assert reassembler.partial_blobs == 0


def test_a_consumer_that_stops_before_acking_leaves_the_message_redelivered_to_the_next(
    orchestrator_bus: Bus,
) -> None:
    bus = orchestrator_bus
    careless = Inbox(then=None)  # never acks
    first = bus.consume(t.UPDATES_QUEUE, careless)
    bus.publish(t.UPDATES_EXCHANGE, KEY, b"update", message_id="m-1")
    assert careless.wait(1)[0].redelivered is False
    first.stop()
    assert not first.alive

    careful = Inbox()
    second = bus.consume(t.UPDATES_QUEUE, careful)
    again = careful.wait(1)[0]
    second.stop()
    assert (again.body, again.message_id, again.redelivered) == (b"update", "m-1", True)
    assert bus.queue_depth(t.UPDATES_QUEUE) == 0


def test_a_rejected_message_lands_in_dead_letters_with_its_reason(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    consumer = bus.consume(t.SIGNALS_QUEUE, Inbox(then=lambda d: d.reject("malformed: no type")))
    bus.publish(t.SIGNALS_EXCHANGE, t.signal_routing_key("dev1"), b"{oops", headers={"k": "v"})
    wait_until(lambda: bus.queue_depth(t.DEAD_LETTER_QUEUE) == 1)
    consumer.stop()
    dead = bus.get(t.DEAD_LETTER_QUEUE)
    assert dead is not None
    dead.ack()
    assert dead.body == b"{oops"
    assert dead.headers["k"] == "v"
    assert dead.headers[REASON_HEADER] == "malformed: no type"
    assert dead.headers[ORIGINAL_EXCHANGE_HEADER] == t.SIGNALS_EXCHANGE
    assert dead.headers[ORIGINAL_ROUTING_KEY_HEADER] == t.signal_routing_key("dev1")
    assert dead.headers[ORIGINAL_QUEUE_HEADER] == t.SIGNALS_QUEUE
    assert bus.queue_depth(t.SIGNALS_QUEUE) == 0


def test_a_handler_that_raises_gets_one_redelivery_then_dead_letters_and_the_consumer_goes_on(
    orchestrator_bus: Bus,
) -> None:
    bus = orchestrator_bus
    seen: list[tuple[bytes, bool]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.redelivered))
        if delivery.body == b"poison":
            raise ValueError("cannot parse")
        delivery.ack()

    consumer = bus.consume(t.CONTROL_QUEUE, handler, prefetch=1)
    bus.publish(t.CONTROL_EXCHANGE, t.CONTROL_ROUTING_KEY, b"poison")
    bus.publish(t.CONTROL_EXCHANGE, t.CONTROL_ROUTING_KEY, b"good")
    wait_until(lambda: (b"good", False) in seen and bus.queue_depth(t.DEAD_LETTER_QUEUE) == 1)
    assert consumer.alive
    consumer.stop()
    assert [s for s in seen if s[0] == b"poison"] == [(b"poison", False), (b"poison", True)]
    dead = bus.get(t.DEAD_LETTER_QUEUE)
    assert dead is not None
    assert dead.headers[REASON_HEADER] == "handler error: ValueError('cannot parse')"
    dead.ack()


def test_publishing_with_no_queue_bound_for_the_key_is_an_error(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    with pytest.raises(Unroutable):
        bus.publish(t.DEVICES_EXCHANGE, t.device_routing_key("nobody"), b"lost")
    # Fire-and-forget feeds opt out of mandatory: no observer means no one to tell.
    bus.publish(t.EVENTS_EXCHANGE, "", b"nobody listens", mandatory=False)
    bus.publish(t.UPDATES_EXCHANGE, KEY, b"the bus still works after the error")
    assert bus.queue_depth(t.UPDATES_QUEUE) == 1


def test_publishing_to_a_missing_exchange_is_an_error_and_the_bus_goes_on(bus: Bus) -> None:
    with pytest.raises(BusError):
        bus.publish("fedmq.nowhere", "x", b"lost")
    t.declare(bus)
    bus.publish(t.UPDATES_EXCHANGE, KEY, b"fine")
    assert bus.queue_depth(t.UPDATES_QUEUE) == 1


def test_topic_bindings_match_words_like_rabbitmq(bus: Bus) -> None:
    patterns = {"star": "a.*.c", "hash": "a.#", "mid": "a.#.c", "exact": "a.b"}
    bus.declare(
        t.Topology(
            exchanges=(t.Exchange("x.topic", "topic"),),
            queues=tuple(t.Queue(q, dead_letter_exchange=None) for q in patterns),
            bindings=tuple(t.Binding("x.topic", q, p) for q, p in patterns.items()),
        )
    )
    for key in ("a.b.c", "a", "a.b", "a.x.y.c"):
        bus.publish("x.topic", key, key.encode())
    got = {queue: bus.queue_depth(queue) for queue in patterns}
    assert got == {"star": 1, "hash": 4, "mid": 2, "exact": 1}


def test_prefetch_bounds_the_unacked_messages_a_consumer_holds(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    holder = Inbox(then=None)
    consumer = bus.consume(t.UPDATES_QUEUE, holder, prefetch=2)
    for i in range(5):
        bus.publish(t.UPDATES_EXCHANGE, KEY, b"%d" % i)
    holder.wait(2)
    wait_until(lambda: bus.queue_depth(t.UPDATES_QUEUE) == 3)
    time.sleep(0.2)  # give a third delivery the chance to (wrongly) arrive
    assert len(holder.deliveries) == 2
    # Acks from another thread than the consumer's are allowed and free the window.
    acker = threading.Thread(target=lambda: [d.ack() for d in holder.deliveries[:2]])
    acker.start()
    acker.join()
    holder.wait(4)
    consumer.stop()


def test_get_pulls_one_message_and_a_requeued_one_comes_back_redelivered(
    orchestrator_bus: Bus,
) -> None:
    bus = orchestrator_bus
    assert bus.get(t.UPDATES_QUEUE, timeout=0.2) is None
    bus.publish(t.UPDATES_EXCHANGE, KEY, b"x", headers={"n": 7}, message_id="m-7")
    first = bus.get(t.UPDATES_QUEUE, timeout=WAIT_S)
    assert first is not None
    assert (first.body, first.headers["n"], first.message_id, first.redelivered) == (
        b"x",
        7,
        "m-7",
        False,
    )
    assert first.timestamp is not None and abs(first.timestamp - time.time()) < 60
    first.requeue()
    with pytest.raises(BusError):
        first.ack()  # settled already
    second = bus.get(t.UPDATES_QUEUE, timeout=WAIT_S)
    assert second is not None and second.redelivered is True
    second.ack()
    assert bus.queue_depth(t.UPDATES_QUEUE) == 0


def test_consuming_a_missing_queue_is_an_error(bus: Bus) -> None:
    with pytest.raises(BusError):
        bus.consume("no-such-queue", Inbox())


def test_an_observer_gets_events_on_its_own_queue_that_goes_away_with_it(bus: Bus) -> None:
    inbox = Inbox()
    observer = t.observe_events(bus, "dash1", inbox)
    bus.publish(t.EVENTS_EXCHANGE, "", b"round 1 done", mandatory=False)
    assert inbox.wait(1)[0].body == b"round 1 done"
    observer.stop()
    with pytest.raises(BusError):
        bus.queue_depth(t.events_queue("dash1"))


@pytest.mark.integration
def test_a_consumer_and_a_publisher_survive_the_broker_closing_their_connections(
    amqp_url: str,
) -> None:
    bus = connect(amqp_url, FAST)
    try:
        t.declare(bus)
        inbox = Inbox()
        consumer = bus.consume(t.UPDATES_QUEUE, inbox)
        bus.publish(t.UPDATES_EXCHANGE, KEY, b"before")
        inbox.wait(1)
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "fedmq test: kill"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        bus.publish(t.UPDATES_EXCHANGE, KEY, b"after")  # retried on a new connection
        assert [d.body for d in inbox.wait(2)] == [b"before", b"after"]
        assert consumer.alive
    finally:
        bus.close()


def test_a_deleted_device_queue_takes_its_bindings_with_it(orchestrator_bus: Bus) -> None:
    queue = t.declare_device(orchestrator_bus, "leaver", "run1")
    orchestrator_bus.publish(t.DEVICES_EXCHANGE, t.device_routing_key("leaver"), b"hi")
    assert orchestrator_bus.queue_depth(queue) == 1
    orchestrator_bus.delete_queue(queue)
    orchestrator_bus.delete_queue(queue)  # absent is fine
    with pytest.raises(BusError):
        orchestrator_bus.publish(t.DEVICES_EXCHANGE, t.device_routing_key("leaver"), b"hi")


def test_a_batch_consumer_gets_a_backlog_in_order_in_bounded_batches(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    for i in range(50):
        bus.publish(t.UPDATES_EXCHANGE, KEY, f"m{i}".encode())
    batches: list[list[bytes]] = []
    done = threading.Event()

    def handle(ds: list[Delivery]) -> None:
        batches.append([d.body for d in ds])
        for d in ds:
            d.ack()
        if sum(map(len, batches)) == 50:
            done.set()

    consumer = bus.consume_batches(
        t.UPDATES_QUEUE, handle, batching=Batching(max_messages=16, linger_s=0.05), prefetch=16
    )
    try:
        assert done.wait(WAIT_S)
    finally:
        consumer.stop()
    assert [b for batch in batches for b in batch] == [f"m{i}".encode() for i in range(50)]
    assert max(map(len, batches)) <= 16
    assert len(batches) < 50  # the backlog came in batches, not one by one
    assert bus.queue_depth(t.UPDATES_QUEUE) == 0


def test_a_batch_handler_that_raises_leaves_each_message_to_the_policy(
    orchestrator_bus: Bus,
) -> None:
    """Settled messages stay settled; each unsettled one is requeued once, then
    dead-lettered with the error, on its own."""
    bus = orchestrator_bus
    for i in range(3):
        bus.publish(t.UPDATES_EXCHANGE, KEY, f"m{i}".encode())
    seen: list[tuple[bytes, bool]] = []

    def handle(ds: list[Delivery]) -> None:
        for d in ds:
            seen.append((d.body, d.redelivered))
            if d.body == b"m0":
                d.ack()
        raise RuntimeError("the batch broke")

    consumer = bus.consume_batches(
        t.UPDATES_QUEUE, handle, batching=Batching(max_messages=8, linger_s=0.05), prefetch=8
    )
    try:
        wait_until(lambda: bus.queue_depth(t.DEAD_LETTER_QUEUE) == 2)
    finally:
        consumer.stop()
    assert seen.count((b"m0", False)) == 1 and (b"m0", True) not in seen
    for body in (b"m1", b"m2"):
        assert (body, False) in seen and (body, True) in seen
    dead = [bus.get(t.DEAD_LETTER_QUEUE, timeout=1.0) for _ in range(2)]
    assert sorted(d.body for d in dead if d) == [b"m1", b"m2"]
    assert all(d and "the batch broke" in str(d.headers[REASON_HEADER]) for d in dead)
    for d in dead:
        assert d is not None
        d.ack()


def test_a_batch_settled_in_a_mix_acks_exactly_the_acked_messages(orchestrator_bus: Bus) -> None:
    """A batch's acks are sent together (one multiple ack where that is exact); a message
    requeued in the middle of the batch, or left unsettled, is not acked with the others."""
    bus = orchestrator_bus
    for i in range(5):
        bus.publish(t.UPDATES_EXCHANGE, KEY, f"m{i}".encode())
    first: list[bytes] = []
    again: list[bytes] = []
    got_all = threading.Event()

    def handle(ds: list[Delivery]) -> None:
        for d in ds:
            if d.redelivered:
                again.append(d.body)
                d.ack()
                continue
            first.append(d.body)
            if d.body == b"m1":
                d.requeue()
            elif d.body != b"m3":  # m3 stays unsettled until the consumer goes
                d.ack()
        if len(first) == 5:
            got_all.set()

    consumer = bus.consume_batches(
        t.UPDATES_QUEUE, handle, batching=Batching(max_messages=8, linger_s=0.05), prefetch=8
    )
    try:
        assert got_all.wait(WAIT_S)
        wait_until(lambda: b"m1" in again)
    finally:
        consumer.stop()
    assert sorted(first) == [f"m{i}".encode() for i in range(5)]
    # m3 was never settled: stopping the consumer gave it back; nothing else is left.
    leftover = bus.get(t.UPDATES_QUEUE, timeout=1.0)
    assert leftover is not None and leftover.body == b"m3" and leftover.redelivered
    leftover.ack()
    assert bus.get(t.UPDATES_QUEUE, timeout=0.2) is None


def test_publish_many_delivers_every_message_in_order(orchestrator_bus: Bus) -> None:
    bus = orchestrator_bus
    q = t.declare_device(bus, "many1", "run1")
    bus.publish_many(
        [
            Outgoing(
                t.DEVICES_EXCHANGE, t.device_routing_key("many1"), f"n{i}".encode(), None, f"id{i}"
            )
            for i in range(20)
        ]
        + [Outgoing(t.DEVICES_EXCHANGE, t.device_routing_key("nobody"), b"dropped")]
    )
    got = [bus.get(q, timeout=2.0) for _ in range(20)]
    assert [(d.body, d.message_id) for d in got if d] == [
        (f"n{i}".encode(), f"id{i}") for i in range(20)
    ]
    for d in got:
        assert d is not None
        d.ack()
    assert bus.queue_depth(q) == 0
