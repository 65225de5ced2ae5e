"""What the broker-permission tests share: the generated definitions module, and actions
tried against the live broker as one user (allowed, or refused with ACCESS_REFUSED)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pika
from pika.adapters.blocking_connection import BlockingChannel

from protocol import topology

ROOT = Path(__file__).resolve().parents[2]

Action = Callable[[BlockingChannel], object]


def definitions() -> ModuleType:
    """deploy/rabbitmq/make_definitions.py (PERMISSIONS, TOPIC_PERMISSIONS, ...)."""
    path = ROOT / "deploy" / "rabbitmq" / "make_definitions.py"
    spec = importlib.util.spec_from_file_location("fedmq_make_definitions_tests", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def allowed(url: str, action: Action) -> bool:
    """True if the broker lets the user of ``url`` do ``action``; False on ACCESS_REFUSED."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        action(ch)
        return True
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 403, e
        return False
    finally:
        if conn.is_open:
            conn.close()


def publish(exchange: str, key: str) -> Action:
    return lambda ch: ch.basic_publish(exchange, key, b"{}", mandatory=False)


def read(queue: str) -> Action:
    return lambda ch: ch.basic_get(queue, auto_ack=False)


def bind(queue: str, key: str) -> Action:
    return lambda ch: ch.queue_bind(queue, topology.DEVICES_EXCHANGE, key)


def declare(queue: str, expires_s: float = topology.DEVICE_QUEUE_EXPIRES_S) -> Action:
    """Declare ``queue`` with a device queue's arguments (the broker refuses a declaration
    whose arguments differ from the queue's own before it looks at permissions)."""
    args = topology.Queue(queue, expires_s=expires_s).arguments
    return lambda ch: ch.queue_declare(queue, durable=True, arguments=args)


def declare_exchange(name: str) -> Action:
    return lambda ch: ch.exchange_declare(name, "topic", durable=True)
