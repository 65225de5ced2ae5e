"""Device permissions on the real local RabbitMQ, in a scratch vhost with scratch users.

1. The shipped shared ``device`` user (deploy/rabbitmq/make_definitions.py, from
   ``protocol.permissions.enrollment``, applied as it is) may register and nothing else: its
   own reply queue and a ``Register`` under ``signal.r<16 hex>``; no registered client's
   routing key or queue, no updates, nothing of the orchestrator's.
2. Per-device users made the way the orchestrator makes them (``ManagementAccounts``
   against the real management API, ``protocol.permissions.device_account``): a device
   cannot publish under another's routing key, read or bind another's queue, or touch the
   orchestrator's side; a revoked user cannot log in.
tests/faults/test_broker_accounts.py runs a whole federation that way.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pika
import pytest

from orchestrator.accounts import ManagementAccounts
from protocol import topology
from protocol.bus import connect
from tests.faults.broker import (
    Action,
    allowed,
    bind,
    declare,
    declare_exchange,
    definitions,
    publish,
    read,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="needs the local rabbitmqctl"),
]

PASSWORD = "device-password-for-tests"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


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
        for exchange, write_keys, read_keys in topics:
            _ctl("set_topic_permissions", "-p", self.vhost, name, exchange, write_keys, read_keys)
        return name

    def attempt(self, user: str, action: Action) -> bool:
        """True if the broker allows ``action`` for ``user``; False on ACCESS_REFUSED."""
        return allowed(f"amqp://{user}:{PASSWORD}@{self.base}/{quote(self.vhost, safe='')}", action)

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


REPLY_KEY = "r0123456789abcdef"  # what devices/wire.py makes


def test_the_shared_device_user_may_only_register(broker: Broker) -> None:
    d = definitions()
    user = broker.user(
        f"device-{uuid.uuid4().hex[:6]}", d.PERMISSIONS["device"], d.TOPIC_PERMISSIONS["device"]
    )
    ok = broker.attempt
    a = broker.alice
    reply = f"device.{REPLY_KEY}"
    # Registration: its reply queue, bound to its reply key, and a Register.
    assert ok(user, declare(reply))
    assert ok(user, bind(reply, f"device.{REPLY_KEY}"))
    assert ok(user, read(reply))
    assert ok(user, publish(topology.SIGNALS_EXCHANGE, f"signal.{REPLY_KEY}"))
    # Nothing a registered device does, nor the orchestrator's side.
    assert not ok(user, publish(topology.SIGNALS_EXCHANGE, f"signal.{a}"))
    assert not ok(user, publish(topology.UPDATES_EXCHANGE, f"update.run1.3.{a}"))
    assert not ok(user, read(f"device.{a}"))
    assert not ok(user, bind(reply, f"device.{a}"))
    assert not ok(user, bind(reply, "broadcast.run1"))
    assert not ok(user, bind(reply, "#"))
    assert not ok(user, publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY))
    assert not ok(user, publish(topology.DEVICES_EXCHANGE, f"device.{a}"))
    assert not ok(user, read(topology.SIGNALS_QUEUE))
    assert not ok(user, read(topology.UPDATES_QUEUE))
    assert not ok(user, read(topology.DEAD_LETTER_QUEUE))
    assert not ok(user, declare_exchange(topology.SIGNALS_EXCHANGE))


def test_provisioned_device_users_cannot_speak_for_or_read_another_device(
    broker: Broker, management_url: str
) -> None:
    """Users made the way the orchestrator makes them (ManagementAccounts, the real
    management API): each is held to its own keys and queue by the broker itself."""
    accounts = ManagementAccounts(management_url, broker.vhost)
    a, b = broker.alice, broker.bob
    try:
        for cid in (a, b):
            accounts.provision(cid, PASSWORD)
            broker.users.append(cid)
        ok = broker.attempt
        # What a device does.
        assert ok(a, declare(f"device.{a}"))
        assert ok(a, bind(f"device.{a}", f"device.{a}"))
        assert ok(a, bind(f"device.{a}", "broadcast.run1"))
        assert ok(a, read(f"device.{a}"))
        assert ok(a, publish(topology.SIGNALS_EXCHANGE, f"signal.{a}"))
        assert ok(a, publish(topology.UPDATES_EXCHANGE, f"update.run1.3.{a}"))
        # Another device's keys and queue.
        assert not ok(a, publish(topology.SIGNALS_EXCHANGE, f"signal.{b}"))
        assert not ok(a, publish(topology.UPDATES_EXCHANGE, f"update.run1.3.{b}"))
        assert not ok(a, read(f"device.{b}"))
        assert not ok(a, declare(f"device.{b}"))
        assert not ok(a, bind(f"device.{a}", f"device.{b}"))
        assert not ok(a, bind(f"device.{a}", "#"))
        # The orchestrator's side.
        assert not ok(a, publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY))
        assert not ok(a, publish(topology.DEVICES_EXCHANGE, f"device.{a}"))
        assert not ok(a, read(topology.SIGNALS_QUEUE))
        assert not ok(a, declare_exchange(topology.SIGNALS_EXCHANGE))
        # Revoked: the user is gone (and so is anything it could do).
        accounts.revoke(a)
        assert not accounts.exists(a)
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            ok(a, read(f"device.{a}"))
        accounts.revoke(a)  # twice is fine
    finally:
        accounts.close()


@pytest.mark.parametrize("service", ["gateway", "dashboard"])
def test_the_gateway_and_dashboard_cannot_declare_or_delete_the_orchestrators_side(
    broker: Broker, service: str
) -> None:
    d = definitions()
    user = broker.user(
        f"{service}-{uuid.uuid4().hex[:6]}",
        d.PERMISSIONS[service],
        d.TOPIC_PERMISSIONS.get(service, []),
    )
    ok = broker.attempt
    assert ok(user, publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY))
    for queue in (topology.UPDATES_QUEUE, topology.SIGNALS_QUEUE, topology.CONTROL_QUEUE):
        assert not ok(user, lambda ch, q=queue: ch.queue_delete(q))
        assert not ok(user, declare(queue))
    assert not ok(user, declare_exchange(topology.UPDATES_EXCHANGE))
    assert not ok(user, lambda ch: ch.exchange_delete(topology.UPDATES_EXCHANGE))
    if service == "gateway":  # what it does for its HTTP devices
        reply = f"device.gw-{uuid.uuid4().hex}"
        assert ok(user, declare(reply))
        assert ok(user, bind(reply, reply))
        assert ok(user, read(reply))
        assert ok(user, publish(topology.SIGNALS_EXCHANGE, f"signal.{broker.alice}"))
        assert ok(user, publish(topology.UPDATES_EXCHANGE, f"update.run1.2.{broker.alice}"))
        assert not ok(user, bind(reply, "#"))
