"""The bus's errors: transport exceptions are translated into these at the boundary.

Callers catch ``BusError``; nothing outside ``protocol/bus/amqp.py`` ever sees a pika
exception (``raise ConnectionLost(...) from None`` keeps pika's internals out of tracebacks).
"""

from __future__ import annotations


class BusError(Exception):
    """Anything the bus could not do: a missing exchange or queue, a nacked publish, ..."""


class Unroutable(BusError):
    """A mandatory publish matched no queue, so the broker would have dropped it."""


class ConnectionLost(BusError):
    """The connection to the broker is gone and the bounded reconnect attempts ran out."""
