"""Find real RabbitMQ and Postgres for the integration tests.

Order (issue 2, item 10): ``FEDMQ_TEST_AMQP_URL`` / ``FEDMQ_TEST_DATABASE_URL`` when set;
else the local servers on their default ports, started if installed but down; else
testcontainers when a Docker engine answers; else a clear message of what to install.
Runnable as ``python -m tests.services`` to bring the services up before pytest.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672"


class ServiceUnavailable(RuntimeError):
    pass


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.3)
    return False


def _start_local_rabbitmq() -> bool:
    if port_open("127.0.0.1", 5672):
        return True
    if not shutil.which("rabbitmq-server"):
        return False
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True)
    if shutil.which("rabbitmqctl"):
        subprocess.run(
            ["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=120
        )
    return _wait_port("127.0.0.1", 5672, 60)


def _enable_local_management() -> bool:
    """The management API (per-device broker users, tests/faults/test_broker_accounts.py):
    enabling the plugin is online and idempotent, and takes a few seconds the first time."""
    if port_open("127.0.0.1", 15672):
        return True
    if not shutil.which("rabbitmq-plugins"):
        return False
    subprocess.run(
        ["rabbitmq-plugins", "enable", "rabbitmq_management"],
        check=False,
        capture_output=True,
        timeout=120,
    )
    return _wait_port("127.0.0.1", 15672, 60)


def _start_local_postgres() -> bool:
    if port_open("127.0.0.1", 5432):
        return True
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if not versions or not shutil.which("pg_ctlcluster"):
        return False
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False,
        capture_output=True,
    )
    return _wait_port("127.0.0.1", 5432, 60)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@dataclass
class Services:
    amqp_url: str
    database_url: str
    local_rabbitmq: bool  # rabbitmqctl can make a vhost per test
    _containers: list[Any] = field(default_factory=list)
    # RabbitMQ's management API with an administrator (http://user:password@host:port).
    management_url: str | None = None

    def stop(self) -> None:
        for c in self._containers:
            c.stop()


def discover() -> Services:
    amqp = os.environ.get("FEDMQ_TEST_AMQP_URL")
    pg = os.environ.get("FEDMQ_TEST_DATABASE_URL")
    containers: list[Any] = []
    local_rabbit = False
    management = os.environ.get("FEDMQ_TEST_MANAGEMENT_URL")
    if amqp is None and _start_local_rabbitmq():
        amqp, local_rabbit = LOCAL_AMQP_URL, shutil.which("rabbitmqctl") is not None
        if management is None and _enable_local_management():
            management = LOCAL_MANAGEMENT_URL
    if pg is None and _start_local_postgres():
        pg = LOCAL_PG_URL
    if (amqp is None or pg is None) and _docker_answers():
        if amqp is None:
            from testcontainers.rabbitmq import RabbitMqContainer

            rc = RabbitMqContainer("rabbitmq:3.13-management").with_exposed_ports(15672).start()
            containers.append(rc)
            host = rc.get_container_host_ip()
            amqp = f"amqp://guest:guest@{host}:{rc.get_exposed_port(5672)}/%2F"
            management = f"http://guest:guest@{host}:{rc.get_exposed_port(15672)}"
        if pg is None:
            from testcontainers.postgres import PostgresContainer

            pc = PostgresContainer("postgres:16", driver="psycopg").start()
            containers.append(pc)
            pg = pc.get_connection_url()
    missing = [n for n, v in (("RabbitMQ", amqp), ("PostgreSQL", pg)) if v is None]
    if missing:
        raise ServiceUnavailable(
            f"{' and '.join(missing)} not found: set FEDMQ_TEST_AMQP_URL / "
            "FEDMQ_TEST_DATABASE_URL, or install them (Debian: apt-get install "
            "rabbitmq-server postgresql), or run a Docker engine for testcontainers."
        )
    assert amqp is not None and pg is not None
    return Services(amqp, pg, local_rabbit, containers, management)


if __name__ == "__main__":
    try:
        s = discover()
    except ServiceUnavailable as e:
        print(f"services: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"services: RabbitMQ {s.amqp_url.split('@')[-1]}, Postgres {s.database_url.split('@')[-1]}"
    )
