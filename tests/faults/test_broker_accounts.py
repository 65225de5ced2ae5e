"""Per-device broker users on the real stack: RabbitMQ with its management API, Postgres,
``fedmq orchestrator`` with ``FEDMQ_BROKER_ACCOUNTS_URL``, a Celery worker and two
``fedmq device`` processes that know only the shared enrollment user.

Each device registers through the enrollment user, gets a broker user named after its
client id (password: its token), reconnects as it and trains two autorun rounds. A third
client ("mallory", registered in the test the same way) then tries to speak for a real
device and read its queue with her own broker user, and the broker refuses her; kicked, her
broker user is deleted and she cannot log in again. With the management API refusing, a
registration that asks for a user is refused with the reason, and nothing of it is kept.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from db import queries as q
from db.engine import session_scope
from db.models import ClientState
from devices import wire
from devices.run import with_credentials
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.accounts import ManagementAccounts, vhost_of
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import permissions, topology
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction
from tests.integration.orchestrator_harness import Harness, harness

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="needs the local RabbitMQ"),
]

K, ROUNDS = 2, 2
ENROLL_PASSWORD = "enrollment-password-for-tests"


def _api(management_url: str) -> httpx.Client:
    parts = httpx.URL(management_url)
    return httpx.Client(
        base_url=f"{parts.scheme}://{parts.host}:{parts.port}",
        auth=(parts.username, parts.password),
        timeout=10.0,
    )


@pytest.fixture
def enrollment(amqp_url: str, management_url: str) -> Iterator[str]:
    """A shared enrollment user in the test's vhost, with the shipped permissions; yields
    its AMQP URL."""
    vhost = vhost_of(amqp_url)
    name = f"enroll-{uuid.uuid4().hex[:8]}"
    perms = permissions.enrollment()
    v, u = quote(vhost, safe=""), quote(name, safe="")
    with _api(management_url) as api:
        api.put(f"/api/users/{u}", json={"password": ENROLL_PASSWORD, "tags": ""})
        api.put(
            f"/api/permissions/{v}/{u}",
            json={"configure": perms.configure, "write": perms.write, "read": perms.read},
        ).raise_for_status()
        for t in perms.topics:
            api.put(
                f"/api/topic-permissions/{v}/{u}",
                json={"exchange": t.exchange, "write": t.write, "read": t.read},
            ).raise_for_status()
        try:
            yield with_credentials(amqp_url, name, ENROLL_PASSWORD)
        finally:
            api.delete(f"/api/users/{u}")


def _create_run(h: Harness) -> str:
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    with session_scope(h.sessions) as s:
        h.run_id = create_run(
            s,
            f"accounts-{uuid.uuid4().hex[:6]}",
            encode(to_numpy(model), Encoding.FP32),
            policy=RoundPolicy(min_clients=K, quorum_fraction=1.0, deadline_s=60),
            extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
        )
    return h.run_id


def _allowed(url: str, action: Callable[[BlockingChannel], object]) -> bool:
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


def _publish(exchange: str, key: str) -> Callable[[BlockingChannel], object]:
    return lambda ch: ch.basic_publish(exchange, key, b"{}", mandatory=False)


def _read(queue: str) -> Callable[[BlockingChannel], object]:
    return lambda ch: ch.basic_get(queue, auto_ack=False)


def test_devices_train_as_their_own_broker_users_and_cannot_speak_for_another(
    amqp_url: str, pg_url: str, management_url: str, enrollment: str, tmp_path: Path
) -> None:
    vhost = vhost_of(amqp_url)
    accounts = ManagementAccounts(management_url, vhost)
    made: list[str] = []
    with harness(amqp_url, pg_url, tmp_path) as h, _api(management_url) as api:
        try:
            run_id = _create_run(h)
            h.procs.orchestrator(env={"FEDMQ_BROKER_ACCOUNTS_URL": management_url})
            for k in range(K):
                h.procs.start(
                    f"device-{k}",
                    *("-m", "fedmq.cli", "device", "--run", run_id, "--index", str(k)),
                    *("--clients", str(K), "--rounds", str(ROUNDS)),
                    env={"FEDMQ_BROKER_URL": enrollment},
                )

            def ready() -> list[str]:
                rows = h.read(lambda s: q.list_clients(s, run_id, ClientState.READY))
                return sorted(c.id for c in rows)

            h.wait(lambda: len(ready()) == K, 120, f"{K} ready devices")
            devices = ready()
            made += devices

            # Each device is connected as its own user; none stayed on the enrollment user.
            def users_connected() -> set[str]:
                rows = api.get(f"/api/vhosts/{quote(vhost, safe='')}/connections").json()
                return {c["user"] for c in rows}

            h.wait(lambda: set(devices) <= users_connected(), 30, "device connections")
            assert vhost_of(enrollment) == vhost
            enroll_user = httpx.URL(enrollment.replace("amqp://", "http://")).username
            assert enroll_user not in users_connected()

            # Mallory registers through the enrollment user, like the devices.
            enroll_bus = connect(enrollment)
            try:
                mallory = wire.register(enroll_bus, run_id, "mallory", broker_account=True)
            finally:
                enroll_bus.close()
            assert mallory is not None and mallory.broker_user == mallory.client_id
            made.append(mallory.client_id)
            own = with_credentials(amqp_url, mallory.client_id, mallory.token)
            victim = devices[0]
            assert _allowed(own, _publish(topology.SIGNALS_EXCHANGE, f"signal.{mallory.client_id}"))
            assert not _allowed(own, _publish(topology.SIGNALS_EXCHANGE, f"signal.{victim}"))
            key = topology.update_routing_key(run_id, 1, victim)
            assert not _allowed(own, _publish(topology.UPDATES_EXCHANGE, key))
            assert not _allowed(own, _read(topology.device_queue(victim)))
            assert not _allowed(own, _read(topology.UPDATES_QUEUE))

            h.command(CommandAction.AUTORUN, rounds=ROUNDS)
            h.wait(
                lambda: sum(r.state == "done" for r in h.rounds()) == ROUNDS,
                150,
                f"{ROUNDS} rounds done",
            )
            assert [(r.number, r.received) for r in h.rounds()] == [
                (n, K) for n in range(1, ROUNDS + 1)
            ], h.procs.output()
            assert h.events("update.refused") == []
            assert h.events("auth.rejected") == []

            # Kicked: her broker user goes, and she cannot log in any more.
            h.command(CommandAction.KICK, target_client=mallory.client_id)
            h.wait(lambda: not accounts.exists(mallory.client_id), 30, "mallory's user deleted")
            with pytest.raises(pika.exceptions.ProbableAuthenticationError):
                _allowed(own, _read(topology.device_queue(mallory.client_id)))
            for cid in devices:
                assert accounts.exists(cid)
        finally:
            for cid in made:
                accounts.revoke(cid)
            accounts.close()


def test_a_registration_is_refused_when_no_broker_user_can_be_made(
    amqp_url: str, pg_url: str, management_url: str, tmp_path: Path
) -> None:
    wrong = httpx.URL(management_url).copy_with(password="not-the-password")
    accounts = ManagementAccounts(str(wrong), vhost_of(amqp_url))
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
        run_id = _create_run(h)
        h.start_service(accounts=accounts)
        with pytest.raises(TimeoutError):
            wire.register(h.bus, run_id, "asks", broker_account=True, timeout_s=5)
        refused = h.events("register.rejected")
        assert len(refused) == 1
        assert "no broker account could be made" in refused[0].detail["reason"]
        assert "401" in refused[0].detail["reason"]
        assert h.read(lambda s: q.list_clients(s, run_id)) == []
        # A device that asks for no broker user of its own still registers.
        plain = wire.register(h.bus, run_id, "plain", timeout_s=20)
        assert plain is not None and plain.broker_user is None
    accounts.close()
