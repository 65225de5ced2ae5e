"""A scratch RabbitMQ vhost and PostgreSQL database for one benchmark run, dropped after.

``BENCH_AMQP_URL`` / ``BENCH_PG_URL`` name the servers (default: the local ones).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy import create_engine, make_url, text

AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Scratch:
    vhost: str
    database: str
    amqp_url: str
    db_url: str


def make_scratch(prefix: str) -> Scratch:
    """A new vhost (guest may do anything in it) and a new empty database."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    vhost = name.replace("_", "-")
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    admin_url = make_url(PG)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return Scratch(
        vhost=vhost,
        database=name,
        amqp_url=f"{AMQP.rsplit('/', 1)[0]}/{quote(vhost, safe='')}",
        db_url=admin_url.set(database=name).render_as_string(hide_password=False),
    )


def drop_scratch(scratch: Scratch) -> None:
    """Drop the database (closing its connections) and delete the vhost."""
    admin = create_engine(make_url(PG), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}" WITH (FORCE)'))
    finally:
        admin.dispose()
    subprocess.run(
        ["rabbitmqctl", "-q", "delete_vhost", scratch.vhost], capture_output=True, check=False
    )
