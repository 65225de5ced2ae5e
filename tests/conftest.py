"""Fixtures that hand each integration test its own real vhost and its own real database."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, make_url, text

from tests.services import Services, ServiceUnavailable, discover

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Tests check correctness, not time: on a loaded 2-core machine hypothesis's default 200 ms
# per-example deadline failed a chunking property that passes in 1 s alone.
settings.register_profile("fedmq", deadline=None)
settings.load_profile("fedmq")


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    try:
        found = discover()
    except ServiceUnavailable as e:
        if IN_CI:
            pytest.fail(f"CI=true and integration services are missing: {e}")
        pytest.skip(str(e))
    yield found
    found.stop()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def management_url(services: Services) -> str:
    """RabbitMQ's management API as an administrator (per-device broker users)."""
    if services.management_url is None:
        if IN_CI:
            pytest.fail("CI=true and RabbitMQ's management API is not available")
        pytest.skip("needs RabbitMQ's management API (rabbitmq-plugins enable rabbitmq_management)")
    return services.management_url


@pytest.fixture
def amqp_url(services: Services) -> Iterator[str]:
    """A fresh, empty vhost per test, so that no test sees another's queues."""
    if not services.local_rabbitmq:
        yield services.amqp_url
        return
    vhost = f"fedmq-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    base = services.amqp_url.rsplit("/", 1)[0]
    yield f"{base}/{quote(vhost, safe='')}"
    if shutil.which("rabbitmqctl"):
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", vhost],
            capture_output=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def pg_url(services: Services) -> Iterator[str]:
    """A fresh Postgres database per test, dropped afterwards."""
    admin_url = make_url(services.database_url)
    name = f"fedmq_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'fedmq.sqlite'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run a test against both storage backends (one suite, two factories)."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))
