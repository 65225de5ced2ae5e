"""Writes deploy/rabbitmq/definitions.json: fedmq's topology and one user per service.

The exchanges, queues and bindings come from ``protocol.topology`` (never retyped here), so
the broker starts with the orchestrator's side of the topology already declared. Celery's
queues (``aggregate``, ``evaluate``, ``edge``) are left to Celery, as topology.py explains.

Each service gets only what its code does on the bus (RabbitMQ checks *configure* to declare
or delete, *write* to publish to an exchange or bind a queue, *read* to consume a queue or
bind from an exchange). Devices and the gateway also get topic permissions, so that a
device cannot bind its queue to ``#`` on ``fedmq.devices`` and read everyone's traffic.

Passwords come from ``RABBITMQ_<USER>_PASSWORD`` (default ``<user>-dev-password``, the ones
.env.example uses). The salt is derived from user and password, so the same passwords give
the same file and a test can check the committed file against this script.

    .venv/bin/python deploy/rabbitmq/make_definitions.py            # dev passwords
    RABBITMQ_DEVICE_PASSWORD=... .venv/bin/python deploy/rabbitmq/make_definitions.py -o FILE

Without ``-o`` it writes definitions.json here and its copy in deploy/k8s/base/rabbitmq/.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from protocol import permissions, topology

VHOST = "fedmq"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "definitions.json"
# kustomize reads nothing outside its folder, so the k8s base keeps a copy.
K8S_COPY = HERE.parent / "k8s" / "base" / "rabbitmq" / "definitions.json"

_WORD = r"[A-Za-z0-9_-]+"
_EXCHANGES = r"fedmq\.(signals|updates|control|devices|events|dead)"
_DEVICE_Q = rf"device\.{_WORD}"
_ORCH_Q = r"orchestrator\.(signals|updates|control)|dead-letters"
_CELERY_Q = r"aggregate|evaluate|edge"
# Celery's own plumbing: gossip/heartbeats (celeryev), remote control and its replies (pidbox).
_CELERY_INTERNAL = r"celeryev(\..*)?|celery\.pidbox|.*\.celery\.pidbox|reply\.celery\.pidbox"


def _any(*parts: str) -> str:
    return "^(" + "|".join(parts) + ")$"


# user -> (configure, write, read) on VHOST
PERMISSIONS: dict[str, tuple[str, str, str]] = {
    # Owns the topology (declares it at start), consumes its three queues, publishes to
    # devices/events/dead, and sends Celery tasks: kombu declares the task queue and
    # publishes through the default exchange (named amq.default in permissions).
    "orchestrator": (
        _any(r"fedmq\..*", r"orchestrator\..*", "dead-letters", _CELERY_Q),
        _any(r"fedmq\..*", r"orchestrator\..*", "dead-letters", _CELERY_Q, r"amq\.default"),
        _any(r"fedmq\..*", r"orchestrator\..*", "dead-letters", _CELERY_Q),
    ),
    # Celery only: its task queues and its own plumbing; nothing of fedmq's exchanges.
    "worker": (
        _any(_CELERY_Q, _CELERY_INTERNAL),
        _any(_CELERY_Q, _CELERY_INTERNAL),
        _any(_CELERY_Q, _CELERY_INTERNAL),
    ),
    # The REST bridge does what devices do on their behalf (its reply queues and its HTTP
    # clients' queues, device.*) and sends the paper's autorun commands. It declares nothing
    # of the orchestrator's: configure on a queue would also let it delete it. Its publishes
    # are mandatory, so one made before the orchestrator's queues exist is refused, not lost.
    "gateway": (
        _any(_DEVICE_Q),
        _any(r"fedmq\.(signals|updates|control|dead)", _DEVICE_Q),
        _any(r"fedmq\.devices", _DEVICE_Q),
    ),
    # Sends operator commands (a mandatory publish, like the gateway's); reads the database.
    "dashboard": ("^$", _any(r"fedmq\.control"), "^$"),
    # The shared enrollment user: registration only (a reply queue device.r<16 hex> and a
    # Register under signal.r<16 hex>). The orchestrator then makes each device a user of its
    # own through the management API (the accounts user below, FEDMQ_BROKER_ACCOUNTS_URL),
    # held to its own routing keys and queue: protocol/permissions.py.
    "device": (
        permissions.enrollment().configure,
        permissions.enrollment().write,
        permissions.enrollment().read,
    ),
}

# user -> [(exchange, write routing keys, read binding keys)] for topic exchanges. RabbitMQ
# checks binding keys on topic exchanges against "read": a device may bind its queue only to
# device.<id> and broadcast.<run>, never to "#" (everyone's registrations and notices).
_DEVICE_TOPICS = [(t.exchange, t.write, t.read) for t in permissions.enrollment().topics]
_GATEWAY_TOPICS = [
    (topology.SIGNALS_EXCHANGE, rf"^signal\.{_WORD}$", "^$"),
    (topology.UPDATES_EXCHANGE, rf"^update\.{_WORD}\.[0-9]+\.{_WORD}$", "^$"),
    (topology.DEVICES_EXCHANGE, "^$", rf"^(device|broadcast)\.{_WORD}$"),
]
TOPIC_PERMISSIONS: dict[str, list[tuple[str, str, str]]] = {
    "device": _DEVICE_TOPICS,
    "gateway": _GATEWAY_TOPICS,
}

ADMIN = "admin"  # management UI and operators
# The orchestrator's management-API user that creates and deletes per-device users. RabbitMQ
# lets only the administrator tag manage users; it gets no permission on any vhost, so it
# cannot speak AMQP there.
ACCOUNTS = "accounts"


def dev_password(user: str) -> str:
    return f"{user}-dev-password"


def password_for(user: str, env: dict[str, str]) -> str:
    return env.get(f"RABBITMQ_{user.upper()}_PASSWORD") or dev_password(user)


def password_hash(user: str, password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = hashlib.sha256(f"{user}:{password}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(stored_hash: str, password: str) -> bool:
    raw = base64.b64decode(stored_hash)
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


def render(env: dict[str, str]) -> dict[str, Any]:
    topo = topology.default_topology()
    users = [ADMIN, ACCOUNTS, *PERMISSIONS]
    return {
        "users": [
            {
                "name": u,
                "password_hash": password_hash(u, password_for(u, env)),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"] if u in (ADMIN, ACCOUNTS) else [],
                "limits": {},
            }
            for u in users
        ],
        # "/" stays for the integration tests (FEDMQ_TEST_AMQP_URL), administered by admin.
        "vhosts": [{"name": VHOST}, {"name": "/"}],
        "permissions": [
            {"user": ADMIN, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}
            for v in (VHOST, "/")
        ]
        + [
            {"user": u, "vhost": VHOST, "configure": c, "write": w, "read": r}
            for u, (c, w, r) in PERMISSIONS.items()
        ],
        "topic_permissions": [
            {"user": u, "vhost": VHOST, "exchange": ex, "write": w, "read": r}
            for u, rows in TOPIC_PERMISSIONS.items()
            for ex, w, r in rows
        ],
        # Operator policies are runtime parameters (``rabbitmqctl set_operator_policy``): the
        # bounds of protocol/topology.py also for queues declared without them.
        "parameters": [
            {
                "vhost": VHOST,
                "component": "operator_policy",
                "name": name,
                "value": {
                    "pattern": pattern,
                    "definition": definition,
                    "priority": 0,
                    "apply-to": "queues",
                },
            }
            for name, (pattern, definition) in topology.operator_policies().items()
        ],
        "policies": [],
        "exchanges": [
            {
                "name": ex.name,
                "vhost": VHOST,
                "type": ex.type,
                "durable": ex.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in topo.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": VHOST,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": q.arguments,
            }
            for q in topo.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": VHOST,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }


def dumps(definitions: dict[str, Any]) -> str:
    return json.dumps(definitions, indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o", "--out", type=Path, action="append", help=f"default: {DEFAULT_OUT} and {K8S_COPY}"
    )
    args = parser.parse_args()
    text = dumps(render(dict(os.environ)))
    for out in args.out or [DEFAULT_OUT, K8S_COPY]:
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
