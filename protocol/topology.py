"""The RabbitMQ topology of DESIGN.md ("RabbitMQ topology") as data, declared idempotently.

Every exchange, queue and routing key name comes from this module, never from literals
scattered around the code base (dramatiq's ``q_name``/``dq_name`` habit). All exchanges and
work queues are durable, and every work queue carries ``x-dead-letter-exchange: fedmq.dead``
so that a message the broker drops (a nack without requeue, a TTL) still lands in
``dead-letters``. ``Delivery.reject`` dead-letters explicitly instead, because only an explicit
publish can carry the reason in the headers.

Celery's queues (``aggregate``, ``evaluate``, ``edge``) are not declared here: Celery declares
its own queues from its configuration, with the arguments it needs, and a second declaration
with different arguments would make the broker refuse one of them.

Bounds (issue 17): queues anyone can make exist, or that nobody may be reading, carry limits
in their arguments. A device queue and a registration's reply queue expire (``x-expires``)
once nobody has consumed, read (``basic.get``) or declared them for a while, so abandoned
registrations vanish; a live device keeps its queue by reading it. ``dead-letters`` holds at
most ``DEAD_LETTER_MAX_LENGTH`` messages and ``DEAD_LETTER_MAX_BYTES`` (oldest dropped
first) for at most ``DEAD_LETTER_TTL_S``. A queue declared before these bounds existed makes
the broker refuse the new arguments (PRECONDITION_FAILED); the buses then use the queue as
it is (``Queue.bounded``) and the broker's operator policies of deploy/rabbitmq bound it
(docs/reliability.md, "Secure defaults").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from protocol.bus.base import Bus, Consumer, Delivery

ExchangeType = Literal["direct", "topic", "fanout"]

SIGNALS_EXCHANGE = "fedmq.signals"
UPDATES_EXCHANGE = "fedmq.updates"
CONTROL_EXCHANGE = "fedmq.control"
DEVICES_EXCHANGE = "fedmq.devices"
EVENTS_EXCHANGE = "fedmq.events"
DEAD_LETTER_EXCHANGE = "fedmq.dead"

SIGNALS_QUEUE = "orchestrator.signals"
UPDATES_QUEUE = "orchestrator.updates"
CONTROL_QUEUE = "orchestrator.control"
DEAD_LETTER_QUEUE = "dead-letters"

CONTROL_ROUTING_KEY = "command"

# A device's queue outlives a broker or network outage of this long with nobody reading it;
# after that it is gone and the device declares it again when it comes back.
DEVICE_QUEUE_EXPIRES_S = 3600.0
# A registration's reply queue is read within the registration's timeout (seconds) or never.
REPLY_QUEUE_EXPIRES_S = 300.0
# dead-letters keeps the newest this many messages / bytes, each at most this long: enough
# to read what went wrong while its consumer (the orchestrator) is away, never the disk.
DEAD_LETTER_MAX_LENGTH = 10_000
DEAD_LETTER_MAX_BYTES = 256 * 1024 * 1024
DEAD_LETTER_TTL_S = 86_400.0

# A routing-key word may not contain the separators of AMQP topic keys or its wildcards,
# otherwise a client id like "a.b" or "#" would let one device read another's queue.
_WORD = re.compile(r"[A-Za-z0-9_\-]{1,100}")


def _word(kind: str, value: str | int) -> str:
    text = str(value)
    if not _WORD.fullmatch(text):
        raise ValueError(f"{kind} {value!r} must be 1-100 characters of [A-Za-z0-9_-]")
    return text


def signals_exchange() -> str:
    return SIGNALS_EXCHANGE


def updates_exchange() -> str:
    return UPDATES_EXCHANGE


def control_exchange() -> str:
    return CONTROL_EXCHANGE


def devices_exchange() -> str:
    return DEVICES_EXCHANGE


def events_exchange() -> str:
    return EVENTS_EXCHANGE


def dead_letter_exchange() -> str:
    return DEAD_LETTER_EXCHANGE


def signal_routing_key(client_id: str) -> str:
    return f"signal.{_word('client id', client_id)}"


def update_routing_key(run_id: str, round: int, client_id: str) -> str:
    """``update.<run>.<round>.<client>``: the sender's id is in the key so that the broker's
    topic permissions can hold a per-device user to its own updates."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round {round!r} must be a non-negative int")
    return f"update.{_word('run id', run_id)}.{round}.{_word('client id', client_id)}"


def device_queue(client_id: str) -> str:
    return f"device.{_word('client id', client_id)}"


def device_routing_key(client_id: str) -> str:
    return f"device.{_word('client id', client_id)}"


def broadcast_routing_key(run_id: str) -> str:
    return f"broadcast.{_word('run id', run_id)}"


def events_queue(observer_id: str) -> str:
    return f"events.{_word('observer id', observer_id)}"


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` is one word, ``#`` zero or more."""
    words, keys = pattern.split("."), routing_key.split(".")

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        if j == len(keys):
            return False
        return words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType
    durable: bool = True


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class Queue:
    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    dead_letter_exchange: str | None = DEAD_LETTER_EXCHANGE
    # Bounds (RabbitMQ's x-expires, x-max-length, x-max-length-bytes, x-message-ttl; the
    # overflow is the default, drop-head). None: unbounded.
    expires_s: float | None = None
    max_length: int | None = None
    max_bytes: int | None = None
    message_ttl_s: float | None = None

    @property
    def bounded(self) -> bool:
        """Declared with bounds: a queue of the same name declared without them (an older
        deployment) is used as it is rather than refused."""
        return any(
            v is not None
            for v in (self.expires_s, self.max_length, self.max_bytes, self.message_ttl_s)
        )

    @property
    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.expires_s is not None:
            args["x-expires"] = _ms(self.expires_s)
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.max_bytes is not None:
            args["x-max-length-bytes"] = self.max_bytes
        if self.message_ttl_s is not None:
            args["x-message-ttl"] = _ms(self.message_ttl_s)
        return args

    def unbounded(self) -> Queue:
        """The same queue without its bounds (what an older deployment declared)."""
        return replace(self, expires_s=None, max_length=None, max_bytes=None, message_ttl_s=None)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str = ""


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = field(default=())

    def __add__(self, other: Topology) -> Topology:
        def merged(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(dict.fromkeys(a + b))

        return Topology(
            merged(self.exchanges, other.exchanges),
            merged(self.queues, other.queues),
            merged(self.bindings, other.bindings),
        )


def exchanges() -> Topology:
    """Every exchange of the design; devices and observers declare these before their queues."""
    return Topology(
        exchanges=(
            Exchange(SIGNALS_EXCHANGE, "topic"),
            Exchange(UPDATES_EXCHANGE, "topic"),
            Exchange(CONTROL_EXCHANGE, "direct"),
            Exchange(DEVICES_EXCHANGE, "topic"),
            Exchange(EVENTS_EXCHANGE, "fanout"),
            Exchange(DEAD_LETTER_EXCHANGE, "fanout"),
        )
    )


@dataclass(frozen=True)
class DeadLetterBounds:
    max_length: int = DEAD_LETTER_MAX_LENGTH
    max_bytes: int = DEAD_LETTER_MAX_BYTES
    ttl_s: float = DEAD_LETTER_TTL_S


def dead_letter_queue(bounds: DeadLetterBounds | None = None) -> Queue:
    b = bounds or DeadLetterBounds()
    # No dead-letter exchange on the dead-letter queue itself: a loop would hide losses (and
    # what its bounds drop is dropped, not dead-lettered again).
    return Queue(
        DEAD_LETTER_QUEUE,
        dead_letter_exchange=None,
        max_length=b.max_length,
        max_bytes=b.max_bytes,
        message_ttl_s=b.ttl_s,
    )


def default_topology(dead_letters: DeadLetterBounds | None = None) -> Topology:
    """The orchestrator's side: all exchanges, its three work queues and ``dead-letters``."""
    return exchanges() + Topology(
        queues=(
            Queue(SIGNALS_QUEUE),
            Queue(UPDATES_QUEUE),
            Queue(CONTROL_QUEUE),
            dead_letter_queue(dead_letters),
        ),
        bindings=(
            Binding(SIGNALS_EXCHANGE, SIGNALS_QUEUE, "signal.*"),
            Binding(UPDATES_EXCHANGE, UPDATES_QUEUE, "update.*.*.*"),
            Binding(CONTROL_EXCHANGE, CONTROL_QUEUE, CONTROL_ROUTING_KEY),
            Binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, ""),
        ),
    )


def operator_policies(
    dead_letters: DeadLetterBounds | None = None,
    device_expires_s: float = DEVICE_QUEUE_EXPIRES_S,
) -> dict[str, tuple[str, dict[str, int]]]:
    """The bounds again as RabbitMQ operator policies: name -> (queue name pattern,
    definition). They bound the queues that were declared without arguments (by an older
    release, or by a device that was not upgraded), which the arguments cannot reach. An
    operator policy, unlike a policy, does not displace an operator's own policy on the same
    queues (HA, quorum, ...): the broker merges the two, the lower limit winning."""
    b = dead_letters or DeadLetterBounds()
    return {
        "fedmq-device-queues": (r"^device\.", {"expires": _ms(device_expires_s)}),
        "fedmq-dead-letters": (
            f"^{DEAD_LETTER_QUEUE}$",
            {
                "max-length": b.max_length,
                "max-length-bytes": b.max_bytes,
                "message-ttl": _ms(b.ttl_s),
            },
        ),
    }


def device_topology(
    client_id: str, run_id: str | None = None, *, expires_s: float | None = DEVICE_QUEUE_EXPIRES_S
) -> Topology:
    """One device's durable queue, bound to its own key and (when known) its run's broadcast.

    The queue expires ``expires_s`` after its last reader left (None: never): a device that
    registered and went away leaves nothing behind, while one that reads it keeps it.

    No exchanges: they are the orchestrator's (or the broker definitions'), and a device user
    has no right to declare them (protocol/permissions.py). A device that comes up before the
    orchestrator ever declared them gets a ``BusError`` here and retries."""
    queue = device_queue(client_id)
    bindings = [Binding(DEVICES_EXCHANGE, queue, device_routing_key(client_id))]
    if run_id is not None:
        bindings.append(Binding(DEVICES_EXCHANGE, queue, broadcast_routing_key(run_id)))
    return Topology(queues=(Queue(queue, expires_s=expires_s),), bindings=tuple(bindings))


def observer_topology(observer_id: str) -> Topology:
    """An observer's private events queue: exclusive and auto-deleted, so it dies with the
    observer; not durable, because events are a live feed that no one replays."""
    queue = events_queue(observer_id)
    return exchanges() + Topology(
        queues=(
            Queue(
                queue, durable=False, exclusive=True, auto_delete=True, dead_letter_exchange=None
            ),
        ),
        bindings=(Binding(EVENTS_EXCHANGE, queue, ""),),
    )


def declare(bus: Bus, topology: Topology | None = None) -> None:
    """Declare ``topology`` (default: the orchestrator's); safe to call any number of times."""
    bus.declare(default_topology() if topology is None else topology)


def declare_device(
    bus: Bus,
    client_id: str,
    run_id: str | None = None,
    *,
    expires_s: float | None = DEVICE_QUEUE_EXPIRES_S,
) -> str:
    """Declare one device's queue and bindings; returns the queue's name."""
    bus.declare(device_topology(client_id, run_id, expires_s=expires_s))
    return device_queue(client_id)


def declare_reply(bus: Bus, reply_key: str, *, expires_s: float = REPLY_QUEUE_EXPIRES_S) -> str:
    """Declare a registration's reply queue ``device.<reply_key>`` (it expires soon after
    the registration: a caller that gave up does not leave it behind)."""
    return declare_device(bus, reply_key, expires_s=expires_s)


def observe_events(
    bus: Bus, observer_id: str, handler: Callable[[Delivery], None], *, prefetch: int | None = None
) -> Consumer:
    """Declare an observer's exclusive events queue and consume it.

    Declaration and consumption go together because on AMQP an exclusive queue belongs to the
    connection that declared it, and it vanishes with that connection: the consumer declares it
    on its own connection, again after every reconnect.
    """
    topology = observer_topology(observer_id)
    return bus.consume(events_queue(observer_id), handler, prefetch=prefetch, declare=topology)
