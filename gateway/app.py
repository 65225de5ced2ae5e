"""``create_app``: the FastAPI application of the REST gateway (OpenAPI at ``/docs``).

The caller owns the bus and the sessions (``fedmq gateway`` opens and closes them)."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy.orm import Session, sessionmaker

from gateway import api_v1, errors, paper
from gateway.bridge import Bridge
from gateway.config import GatewayConfig
from gateway.ledger import Ledger
from gateway.service import Gateway
from protocol.bus import Bus

DESCRIPTION = """Devices that cannot hold an AMQP connection take part in fedmq's rounds over
HTTP. Every action becomes the bus message an AMQP device sends, so the orchestrator cannot
tell the two apart. Blobs are the codec's compressed bytes, exactly as on the bus. Errors
are JSON: `{"status": ..., "reason": ...}`."""


def create_app(config: GatewayConfig, bus: Bus, sessions: sessionmaker[Session]) -> FastAPI:
    app = FastAPI(title="fedmq gateway", version="1", description=DESCRIPTION)
    app.state.gateway = Gateway(
        config,
        Ledger(sessions, config),
        Bridge(
            bus,
            config.chunk_size,
            config.register_timeout_s,
            queue_expires_s=config.device_queue_expires_s,
        ),
    )
    errors.install(app)
    app.include_router(paper.router)
    app.include_router(api_v1.router)
    if config.metrics:
        # Requests by route, method and status, their durations and body sizes (bytes up
        # and down through the gateway), in a registry of this app's own: two apps in one
        # process (tests) must not collide in the default one.
        Instrumentator(
            should_group_status_codes=False,
            excluded_handlers=["/metrics"],
            registry=CollectorRegistry(),
        ).instrument(app).expose(app, include_in_schema=False)
    return app
