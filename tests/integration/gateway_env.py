"""An embedded federation behind the REST gateway, for the gateway's route tests: SQLite, a
private in-process bus, the real orchestrator service (eager tasks), and the FastAPI app
under Starlette's TestClient."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, WireConfig
from devices.http import HttpTransport
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from gateway import GatewayConfig, create_app
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import auth, topology
from protocol.bus import Bus, connect
from protocol.codec import Encoding, encode
from protocol.messages import Command, CommandAction
from tests.integration.lightclient import tiny_model
from workers.app import configure
from workers.config import WorkerConfig

OPERATOR = "gateway-operator-token-for-tests"
MAX_UPLOAD = 64 * 1024


@dataclass
class GatewayEnv:
    http: TestClient
    bus: Bus
    sessions: sessionmaker[Session]
    run_id: str
    base: dict[str, np.ndarray]

    def register(self, name: str = "dev") -> tuple[str, dict[str, str]]:
        res = self.http.post("/client", json={"display_name": name})
        assert res.status_code == 201, res.text
        body = res.json()
        return body["client_id"], {"Authorization": f"Bearer {body['token']}"}

    def read(self, fn: Callable[[Session], Any]) -> Any:
        with session_scope(self.sessions) as s:
            return fn(s)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def client_state(self, client_id: str) -> str | None:
        c = self.read(lambda s: q.get_client(s, client_id))
        return None if c is None else str(c.state)

    def round_state(self, number: int) -> str | None:
        r = self.read(lambda s: q.get_round(s, self.run_id, number))
        return None if r is None else str(r.state)

    def command(self, action: CommandAction, **kw: Any) -> None:
        cmd = auth.sign(Command(run_id=self.run_id, action=action, **kw), OPERATOR)
        self.bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())


@contextmanager
def gateway_env(tmp_path: Path, policy: RoundPolicy | None = None) -> Iterator[GatewayEnv]:
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    migrations.upgrade(url)
    settings = Settings(
        broker_url=f"memory://gw-{uuid.uuid4().hex[:8]}",
        database_url=url,
        operator_token=OPERATOR,  # type: ignore[arg-type]
    )
    sessions = make_sessionmaker(make_engine(url))
    base = tiny_model()
    with session_scope(sessions) as session:
        run_id = create_run(
            session,
            "gw",
            encode(base, Encoding.FP32),
            policy=policy or RoundPolicy(min_clients=1, quorum_fraction=0.5),
        )
    bus = connect(settings.broker_url)
    service = orchestrator_service(settings, bus)
    service.start()
    config = GatewayConfig(
        operator_token=OPERATOR,
        default_run=run_id,
        max_upload_bytes=MAX_UPLOAD,
        register_timeout_s=5.0,
        max_wait_s=0.5,
        poll_interval_s=0.05,
    )
    app = create_app(config, bus, sessions)
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            yield GatewayEnv(http, bus, sessions, run_id, base)
    finally:
        service.stop()
        configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


def amqp_and_http_clients(
    run_id: str, num_clients: int, amqp_url: str, gateway: str
) -> tuple[Bus, list[FederatedClient]]:
    """Devices 0 and 1 of ``num_clients`` over AMQP (one shared connection, returned to be
    closed) and device 2 over HTTP through ``gateway``; not started."""

    def config(i: int, wire: WireConfig) -> DeviceConfig:
        return DeviceConfig(
            run_id=run_id,
            client_index=i,
            num_clients=num_clients,
            wire=wire,
            training=TrainingConfig(torch_threads=None),
        )

    amqp = WireConfig(heartbeat_s=1.0, poll_s=0.05)
    http = WireConfig(heartbeat_s=1.0, poll_s=0.05, transport="http", gateway_url=gateway)
    bus = connect(amqp_url)
    clients = [
        FederatedClient(config(0, amqp), bus),
        FederatedClient(config(1, amqp), bus),
        FederatedClient(config(2, http), HttpTransport(gateway, wait_s=0.5)),
    ]
    return bus, clients
