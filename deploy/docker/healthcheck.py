#!/opt/venv/bin/python
"""Container health checks of the fedmq images (compose healthcheck, k8s probes).

    fedmq-healthcheck consumers QUEUE   the service consumes QUEUE (orchestrator)
    fedmq-healthcheck celery            this host's Celery worker answers a ping (worker)
    fedmq-healthcheck http URL          URL answers 2xx (dashboard, gateway)
    fedmq-healthcheck tcp PORT          something listens on localhost:PORT

Exit 0 when healthy, 1 otherwise. The broker URL is FEDMQ_BROKER_URL, the same the service
uses, so the check runs with the service's own (least) permissions.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request


def consumers(queue: str) -> bool:
    import pika

    params = pika.URLParameters(os.environ["FEDMQ_BROKER_URL"])
    params.socket_timeout = params.blocked_connection_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        # A passive declare needs no configure permission and reports the consumer count.
        ok = connection.channel().queue_declare(queue, passive=True)
        return ok.method.consumer_count > 0
    finally:
        connection.close()


def celery() -> bool:
    from celery import Celery

    app = Celery(broker=os.environ["FEDMQ_BROKER_URL"], set_as_current=False)
    replies = app.control.ping([f"celery@{socket.gethostname()}"], timeout=5.0)
    return bool(replies)


def http(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return 200 <= response.status < 300


def tcp(port: str) -> bool:
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        return True


CHECKS = {"consumers": consumers, "celery": celery, "http": http, "tcp": tcp}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        healthy = CHECKS[argv[0]](*argv[1:])
    except Exception as e:  # any failure to check is "unhealthy", with the reason
        print(f"unhealthy: {e!r}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
