"""What a device may do on the broker, as RabbitMQ permission regexes, built from topology.py.

RabbitMQ checks *configure* to declare or delete a queue or exchange, *write* to publish to
an exchange or to bind a queue (on the queue), *read* to consume a queue or to bind from an
exchange; on topic exchanges *topic permissions* also check the routing key of a publish
(write) and the binding key of a bind (read).

Two kinds of device user:

- **Enrollment** (one shared user, ``device`` in deploy/rabbitmq/definitions.json): only
  registration. It may declare, bind and read a reply queue ``device.r<16 hex>`` and publish
  a ``Register`` under ``signal.r<16 hex>``, nothing else. Client ids are 32 hex characters,
  so no reply key is ever a client id: the shared user can neither speak for a registered
  device nor read its queue.
- **Per-device account** (user name = client id, password = its token; created by the
  orchestrator at registration, orchestrator/accounts.py): publishes only ``signal.<id>``
  and ``update.<run>.<round>.<id>``, reads only ``device.<id>``, binds that queue only to
  ``device.<id>`` and ``broadcast.<run>``. The id is written into every regex, so nothing
  depends on RabbitMQ's ``{username}`` expansion (which plain permissions do not have).

Neither may declare an exchange: the orchestrator (or the broker's definitions) owns them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol import topology

# Device reply keys (devices/wire.py): "r" + 16 hex digits, never a client id (32 hex).
REPLY_KEY = r"r[0-9a-f]{16}"
_WORD = r"[A-Za-z0-9_-]+"


@dataclass(frozen=True)
class TopicPermission:
    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...] = ()


def _any(*parts: str) -> str:
    return "^(" + "|".join(parts) + ")$"


def _exchange(name: str) -> str:
    return re.escape(name)


def enrollment() -> Permissions:
    """The shared user devices register with (and nothing more)."""
    reply_queue = re.escape("device.") + REPLY_KEY
    return Permissions(
        configure=_any(reply_queue),
        # fedmq.dead: the reply queue dead-letters there (declaring it so needs this).
        write=_any(
            _exchange(topology.SIGNALS_EXCHANGE),
            _exchange(topology.DEAD_LETTER_EXCHANGE),
            reply_queue,
        ),
        read=_any(_exchange(topology.DEVICES_EXCHANGE), reply_queue),
        topics=(
            TopicPermission(topology.SIGNALS_EXCHANGE, rf"^signal\.{REPLY_KEY}$", "^$"),
            TopicPermission(topology.UPDATES_EXCHANGE, "^$", "^$"),
            TopicPermission(topology.DEVICES_EXCHANGE, "^$", rf"^device\.{REPLY_KEY}$"),
        ),
    )


def device_account(client_id: str) -> Permissions:
    """The per-device user ``client_id``: its own keys and its own queue only."""
    queue = re.escape(topology.device_queue(client_id))
    cid = re.escape(client_id)
    return Permissions(
        configure=_any(queue),
        # fedmq.dead: its queue dead-letters there, and the device dead-letters a message
        # it cannot use, with the reason.
        write=_any(
            _exchange(topology.SIGNALS_EXCHANGE),
            _exchange(topology.UPDATES_EXCHANGE),
            _exchange(topology.DEAD_LETTER_EXCHANGE),
            queue,
        ),
        read=_any(_exchange(topology.DEVICES_EXCHANGE), queue),
        topics=(
            TopicPermission(topology.SIGNALS_EXCHANGE, rf"^signal\.{cid}$", "^$"),
            TopicPermission(topology.UPDATES_EXCHANGE, rf"^update\.{_WORD}\.[0-9]+\.{cid}$", "^$"),
            TopicPermission(
                topology.DEVICES_EXCHANGE, "^$", rf"^(device\.{cid}|broadcast\.{_WORD})$"
            ),
        ),
    )
