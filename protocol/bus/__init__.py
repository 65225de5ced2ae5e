"""The message bus: one interface (``Bus``), an AMQP adapter and an in-process one.

``connect(url)`` picks the adapter from the URL: ``memory://[name]`` gives the process-wide
in-process bus of that name (so that the components of one process share it), ``amqp://`` and
``amqps://`` a RabbitMQ connection. ``AmqpBus`` is imported lazily, so that embedded mode and
unit tests do not load pika.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from protocol.bus.base import (
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    BatchHandler,
    Batching,
    Bus,
    BusConfig,
    Consumer,
    Delivery,
    Handler,
    Outgoing,
)
from protocol.bus.errors import BusError, ConnectionLost, Unroutable
from protocol.bus.memory import InProcessBus

if TYPE_CHECKING:
    from protocol.bus.amqp import AmqpBus

__all__ = [
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_QUEUE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
    "REASON_HEADER",
    "AmqpBus",
    "BatchHandler",
    "Batching",
    "Bus",
    "BusConfig",
    "BusError",
    "ConnectionLost",
    "Consumer",
    "Delivery",
    "Handler",
    "InProcessBus",
    "Outgoing",
    "Unroutable",
    "connect",
]


def __getattr__(name: str) -> Any:
    if name == "AmqpBus":
        from protocol.bus.amqp import AmqpBus

        return AmqpBus
    raise AttributeError(name)


def connect(url: str, config: BusConfig | None = None, **overrides: Any) -> Bus:
    """A bus for ``url``; ``overrides`` are ``BusConfig`` fields (``prefetch=8`` ...)."""
    base = config or BusConfig()
    if overrides:
        base = BusConfig(**{**base.__dict__, **overrides})
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        name = url[len("memory://") :].strip("/") or "default"
        return InProcessBus.named(name, base)
    if scheme in ("amqp", "amqps"):
        from protocol.bus.amqp import AmqpBus

        return AmqpBus(url, base)
    raise BusError(f"unknown bus URL scheme {scheme!r} (memory://, amqp://, amqps://)")
