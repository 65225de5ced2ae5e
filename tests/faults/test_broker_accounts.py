"""The deployment's broker users on the real stack: every process on the user
deploy/rabbitmq/definitions.json gives it, and every device on a broker user of its own.

RabbitMQ with its management API, Postgres; in a scratch vhost, scratch copies of the
shipped service users (``make_definitions.PERMISSIONS`` / ``TOPIC_PERMISSIONS``):
``fedmq orchestrator`` (its user, and ``FEDMQ_BROKER_ACCOUNTS_URL``), a Celery worker (its
user), ``fedmq gateway`` (its user), two ``fedmq device`` processes that know only the shared
enrollment user ``device``, one ``fedmq device --transport http`` behind the gateway, and
operator commands sent with the dashboard's user.

Each AMQP device registers through the enrollment user, gets a broker user named after its
client id (password: its token), reconnects as it, and all three devices train two autorun
rounds. A fourth client ("mallory", registered in the test the same way) then tries to speak
for a real device and read its queue with her own broker user, and the broker refuses her;
kicked, her broker user is deleted and she cannot log in again. With the management API
refusing, a registration that asks for a user is refused with the reason, and nothing of it
is kept.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pika
import pytest

from dashboard.commands import send
from db import queries as q
from db.engine import session_scope
from db.models import ClientState
from devices import wire
from devices.run import with_credentials
from devices.transport import BusTransport
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.accounts import ManagementAccounts, vhost_of
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import topology
from protocol.bus import BusError, connect
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction
from tests.faults.broker import allowed, definitions, publish, read
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Harness, harness
from tests.net import free_port, wait_http

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="needs the local RabbitMQ"),
]

AMQP_DEVICES, ROUNDS = 2, 2
K = AMQP_DEVICES + 1  # and one HTTP device behind the gateway
PASSWORD = "service-password-for-tests"


def _api(management_url: str) -> httpx.Client:
    parts = httpx.URL(management_url)
    return httpx.Client(
        base_url=f"{parts.scheme}://{parts.host}:{parts.port}",
        auth=(parts.username, parts.password),
        timeout=10.0,
    )


@pytest.fixture
def users(amqp_url: str, management_url: str) -> Iterator[dict[str, str]]:
    """Scratch copies of the shipped service users in the test's vhost; yields each
    service's AMQP URL (``device`` is the shared enrollment user)."""
    d = definitions()
    v = quote(vhost_of(amqp_url), safe="")
    tag = uuid.uuid4().hex[:6]  # users are broker-wide
    urls: dict[str, str] = {}
    with _api(management_url) as api:
        try:
            for service, (configure, write, read) in d.PERMISSIONS.items():
                name = f"{service}-{tag}"
                u = quote(name, safe="")
                api.put(f"/api/users/{u}", json={"password": PASSWORD, "tags": ""})
                urls[service] = with_credentials(amqp_url, name, PASSWORD)
                api.put(
                    f"/api/permissions/{v}/{u}",
                    json={"configure": configure, "write": write, "read": read},
                ).raise_for_status()
                for exchange, w, r in d.TOPIC_PERMISSIONS.get(service, []):
                    api.put(
                        f"/api/topic-permissions/{v}/{u}",
                        json={"exchange": exchange, "write": w, "read": r},
                    ).raise_for_status()
            yield urls
        finally:
            for service in urls:
                api.delete(f"/api/users/{quote(f'{service}-{tag}', safe='')}")


def _create_run(h: Harness, min_clients: int) -> str:
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    with session_scope(h.sessions) as s:
        h.run_id = create_run(
            s,
            f"accounts-{uuid.uuid4().hex[:6]}",
            encode(to_numpy(model), Encoding.FP32),
            policy=RoundPolicy(min_clients=min_clients, quorum_fraction=1.0, deadline_s=60),
            extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
        )
    return h.run_id


def test_every_process_on_its_deployment_user_and_every_device_on_its_own(
    amqp_url: str,
    pg_url: str,
    management_url: str,
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    vhost = vhost_of(amqp_url)
    accounts = ManagementAccounts(management_url, vhost)
    made: list[str] = []
    operator = connect(users["dashboard"])
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h, _api(management_url) as api:
        try:
            run_id = _create_run(h, K)
            h.procs.worker(env={"FEDMQ_BROKER_URL": users["worker"]})
            h.procs.orchestrator(
                env={
                    "FEDMQ_BROKER_URL": users["orchestrator"],
                    "FEDMQ_BROKER_ACCOUNTS_URL": management_url,
                }
            )
            port = free_port()
            gateway = f"http://127.0.0.1:{port}"
            h.procs.start(
                "gateway",
                *("-m", "fedmq.cli", "gateway", "--port", str(port)),
                env={"FEDMQ_BROKER_URL": users["gateway"]},
            )
            device_args = ("--run", run_id, "--clients", str(K), "--rounds", str(ROUNDS))
            for k in range(AMQP_DEVICES):
                h.procs.start(
                    f"device-{k}",
                    *("-m", "fedmq.cli", "device", "--index", str(k), *device_args),
                    env={"FEDMQ_BROKER_URL": users["device"]},
                )
            wait_http(f"{gateway}/openapi.json")
            h.procs.start(
                "device-http",
                *("-m", "fedmq.cli", "device", "--index", str(AMQP_DEVICES), *device_args),
                *("--transport", "http", "--gateway", gateway),
            )

            def ready() -> list[tuple[str, str]]:
                rows = h.read(lambda s: q.list_clients(s, run_id, ClientState.READY))
                return sorted((c.display_name, c.id) for c in rows)

            h.wait(lambda: len(ready()) == K, 120, f"{K} ready devices")
            by_name = dict(ready())
            amqp_ids = [by_name[f"device-{k}"] for k in range(AMQP_DEVICES)]
            made += by_name.values()

            # Each AMQP device is connected as its own user; none stayed on the enrollment
            # user. The HTTP device has no broker user: the gateway speaks for it.
            def users_connected() -> set[str]:
                rows = api.get(f"/api/vhosts/{quote(vhost, safe='')}/connections").json()
                return {c["user"] for c in rows}

            h.wait(lambda: set(amqp_ids) <= users_connected(), 30, "device connections")
            enroll_user = httpx.URL(users["device"].replace("amqp://", "http://")).username
            assert enroll_user not in users_connected()
            assert not accounts.exists(by_name[f"device-{AMQP_DEVICES}"])

            # Mallory registers through the enrollment user, like the devices.
            enroll_bus = connect(users["device"])
            try:
                mallory = wire.register(enroll_bus, run_id, "mallory", broker_account=True)
            finally:
                enroll_bus.close()
            assert mallory is not None and mallory.broker_user == mallory.client_id
            made.append(mallory.client_id)
            own = with_credentials(amqp_url, mallory.client_id, mallory.token)
            victim = amqp_ids[0]
            assert allowed(own, publish(topology.SIGNALS_EXCHANGE, f"signal.{mallory.client_id}"))
            assert not allowed(own, publish(topology.SIGNALS_EXCHANGE, f"signal.{victim}"))
            key = topology.update_routing_key(run_id, 1, victim)
            assert not allowed(own, publish(topology.UPDATES_EXCHANGE, key))
            assert not allowed(own, read(topology.device_queue(victim)))
            assert not allowed(own, read(topology.UPDATES_QUEUE))

            send(operator, OPERATOR_TOKEN, run_id, CommandAction.AUTORUN, rounds=ROUNDS)
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
            assert "ACCESS_REFUSED" not in h.procs.output()

            # Kicked: her broker user goes, and she cannot log in any more.
            send(
                operator,
                OPERATOR_TOKEN,
                run_id,
                CommandAction.KICK,
                target_client=mallory.client_id,
            )
            h.wait(lambda: not accounts.exists(mallory.client_id), 30, "mallory's user deleted")
            with pytest.raises(pika.exceptions.ProbableAuthenticationError):
                allowed(own, read(topology.device_queue(mallory.client_id)))
            # A restarted device that kept her identity cannot resume as her either (it
            # registers anew instead: devices/client.py).
            transport = BusTransport(
                connect(users["device"]),
                lambda user, pw: connect(with_credentials(amqp_url, user, pw)),
            )
            with pytest.raises(BusError):
                transport.resume(mallory)
            transport.close()
            for cid in amqp_ids:
                assert accounts.exists(cid)
        finally:
            operator.close()
            for cid in made:
                accounts.revoke(cid)
            accounts.close()


def test_a_registration_is_refused_when_no_broker_user_can_be_made(
    amqp_url: str, pg_url: str, management_url: str, tmp_path: Path
) -> None:
    wrong = httpx.URL(management_url).copy_with(password="not-the-password")
    accounts = ManagementAccounts(str(wrong), vhost_of(amqp_url))
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
        run_id = _create_run(h, 1)
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
