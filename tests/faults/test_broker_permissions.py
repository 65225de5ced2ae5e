"""Device permissions on the real local RabbitMQ, in a scratch vhost with scratch users.

1. The shipped shared ``device`` user (deploy/rabbitmq/make_definitions.py: its permissions
   and topic permissions, applied as they are): refused a command, the orchestrator's queue,
   binding ``#`` on ``fedmq.devices`` and routing keys outside ``signal.<id>`` /
   ``update.<run>.<round>``. Its documented limit is pinned too: one shared user may publish
   under another client's routing key and read another's queue if it knows the id; what
   stops it speaking for another client is the per-client token the orchestrator checks
   (tests/faults/test_wire_faults.py, test_bad_input.py).
2. Per-device users (one user per client id): with the client id written into the
   permission regexes and ``{username}`` in the topic permissions (RabbitMQ expands it in
   topic permissions only, not in the plain ones), a device cannot publish to another's
   routing key nor read another's queue. This is the recipe deploy/README.md points to for
   per-device isolation.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from protocol import topology
from protocol.bus import connect

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="needs the local rabbitmqctl"),
]

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "device-password-for-tests"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _definitions() -> ModuleType:
    path = ROOT / "deploy" / "rabbitmq" / "make_definitions.py"
    spec = importlib.util.spec_from_file_location("fedmq_make_definitions_perm", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Broker:
    """A scratch vhost with the fedmq topology and scratch users, removed afterwards."""

    def __init__(self, base_url: str) -> None:
        self.vhost = f"fedmq-perm-{uuid.uuid4().hex[:8]}"
        self.base = base_url.rsplit("/", 1)[0].split("@", 1)[1]  # host:port
        self.users: list[str] = []
        tag = uuid.uuid4().hex[:6]  # users are broker-wide: unique names
        self.alice, self.bob = f"alice-{tag}", f"bob-{tag}"
        _ctl("add_vhost", self.vhost)
        _ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        bus = connect(f"amqp://guest:guest@{self.base}/{quote(self.vhost, safe='')}")
        try:
            topology.declare(bus)
            for cid in (self.alice, self.bob):
                topology.declare_device(bus, cid, "run1")
        finally:
            bus.close()

    def user(
        self, name: str, perms: tuple[str, str, str], topics: list[tuple[str, str, str]]
    ) -> str:
        _ctl("add_user", name, PASSWORD)
        self.users.append(name)
        _ctl("set_permissions", "-p", self.vhost, name, *perms)
        for exchange, write, read in topics:
            _ctl("set_topic_permissions", "-p", self.vhost, name, exchange, write, read)
        return name

    def attempt(self, user: str, action: Callable[[BlockingChannel], object]) -> bool:
        """True if the broker allows ``action`` for ``user``; False on ACCESS_REFUSED."""
        params = pika.URLParameters(
            f"amqp://{user}:{PASSWORD}@{self.base}/{quote(self.vhost, safe='')}"
        )
        conn = pika.BlockingConnection(params)
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

    def close(self) -> None:
        for u in self.users:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", u], capture_output=True, timeout=60)
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", self.vhost], capture_output=True, timeout=60
        )


@pytest.fixture
def broker(services) -> Iterator[Broker]:  # type: ignore[no-untyped-def]
    if not services.local_rabbitmq:
        pytest.skip("needs the local RabbitMQ (scratch users and vhosts)")
    b = Broker(services.amqp_url)
    yield b
    b.close()


def publish(exchange: str, key: str) -> Callable[[BlockingChannel], object]:
    return lambda ch: ch.basic_publish(exchange, key, b"{}", mandatory=False)


def read(queue: str) -> Callable[[BlockingChannel], object]:
    return lambda ch: ch.basic_get(queue, auto_ack=False)


def bind(queue: str, key: str) -> Callable[[BlockingChannel], object]:
    return lambda ch: ch.queue_bind(queue, topology.DEVICES_EXCHANGE, key)


def test_the_shared_device_user_is_fenced_off_the_orchestrators_side(broker: Broker) -> None:
    d = _definitions()
    user = broker.user(
        f"device-{uuid.uuid4().hex[:6]}", d.PERMISSIONS["device"], d.TOPIC_PERMISSIONS["device"]
    )
    ok = broker.attempt
    a, b = broker.alice, broker.bob
    # What a device does.
    assert ok(user, publish(topology.SIGNALS_EXCHANGE, f"signal.{a}"))
    assert ok(user, publish(topology.UPDATES_EXCHANGE, "update.run1.3"))
    assert ok(user, read(f"device.{a}"))
    assert ok(user, bind(f"device.{a}", f"device.{a}"))
    # What it must not.
    assert not ok(user, publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY))
    assert not ok(user, publish(topology.DEVICES_EXCHANGE, f"device.{b}"))
    assert not ok(user, publish(topology.SIGNALS_EXCHANGE, "signal.#"))
    assert not ok(user, publish(topology.UPDATES_EXCHANGE, "update.run1.not-a-round"))
    assert not ok(user, read(topology.SIGNALS_QUEUE))
    assert not ok(user, read(topology.UPDATES_QUEUE))
    assert not ok(user, read(topology.DEAD_LETTER_QUEUE))
    assert not ok(user, bind(f"device.{a}", "#"))
    assert not ok(user, bind(f"device.{a}", "device.*"))
    # The documented limit of one shared user (deploy/README.md): the broker cannot tell
    # devices apart, so isolation between them rests on the per-client token.
    assert ok(user, publish(topology.SIGNALS_EXCHANGE, f"signal.{b}"))
    assert ok(user, read(f"device.{b}"))


def per_device(client_id: str) -> tuple[tuple[str, str, str], list[tuple[str, str, str]]]:
    """Permissions of a user named after its client id."""
    own = re.escape(f"device.{client_id}")
    ex = r"fedmq\.(signals|updates|control|devices|events|dead)"
    perms = (
        f"^({ex}|{own})$",
        rf"^(fedmq\.(signals|updates|dead)|{own})$",
        rf"^(fedmq\.devices|{own})$",
    )
    topics = [
        (topology.SIGNALS_EXCHANGE, r"^signal\.{username}$", "^$"),
        (topology.UPDATES_EXCHANGE, r"^update\.[A-Za-z0-9_-]+\.[0-9]+$", "^$"),
        (topology.DEVICES_EXCHANGE, "^$", r"^(device\.{username}|broadcast\.[A-Za-z0-9_-]+)$"),
    ]
    return perms, topics


def test_per_device_users_cannot_speak_for_or_read_another_device(broker: Broker) -> None:
    alice = broker.user(broker.alice, *per_device(broker.alice))
    ok = broker.attempt
    a, b = broker.alice, broker.bob
    assert ok(alice, publish(topology.SIGNALS_EXCHANGE, f"signal.{a}"))
    assert ok(alice, read(f"device.{a}"))
    assert ok(alice, bind(f"device.{a}", f"device.{a}"))
    assert ok(alice, bind(f"device.{a}", "broadcast.run1"))
    assert not ok(alice, publish(topology.SIGNALS_EXCHANGE, f"signal.{b}"))
    assert not ok(alice, read(f"device.{b}"))
    assert not ok(alice, bind(f"device.{a}", f"device.{b}"))
    assert not ok(alice, bind(f"device.{a}", "#"))
    assert not ok(alice, publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY))
    assert not ok(alice, read(topology.SIGNALS_QUEUE))
