"""Where each process serves its Prometheus metrics (``FEDMQ_METRICS_PORT``).

The orchestrator serves its counters and the database's state gauges
(``orchestrator.metrics``); a worker serves what its pool's processes counted
(``workers.metrics``); the gateway serves ``/metrics`` on its own port; ``fedmq up``
serves its supervision counters and gives each service it starts a port of its own, the
next ones after its own. Endpoints listen on ``FEDMQ_METRICS_HOST`` (loopback unless
told otherwise): they carry no secret, but fleet sizes and rates are nobody else's business.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from fedmq.settings import Settings

log = logging.getLogger(__name__)

# `fedmq up`'s services: their offsets from FEDMQ_METRICS_PORT (up itself serves the port).
UP_OFFSETS = {"orchestrator": 1, "worker": 2, "edge-worker": 3}


def serve(
    settings: Settings, registry: CollectorRegistry = REGISTRY, port: int | None = None
) -> int:
    """Serve ``registry`` at ``http://FEDMQ_METRICS_HOST:<port>/metrics``; the port."""
    port = port or settings.metrics_port
    assert port is not None, "serve() needs FEDMQ_METRICS_PORT or a port"
    start_http_server(port, addr=settings.metrics_host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return port


def serve_orchestrator(settings: Settings, sessions: sessionmaker[Session]) -> int | None:
    """The orchestrator's counters and the database's state gauges, when a port is set."""
    if settings.metrics_port is None:
        return None
    from orchestrator.metrics import StateCollector

    REGISTRY.register(StateCollector(sessions))
    return serve(settings)
