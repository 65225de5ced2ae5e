"""``fedmq gateway``: the REST gateway (FastAPI) served by uvicorn."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from fedmq import operator_token
from fedmq.settings import Settings, get_settings

if TYPE_CHECKING:
    from gateway import GatewayConfig

# Seconds open requests (device long polls) get once SIGTERM or Ctrl-C arrived.
SHUTDOWN_S = 5


def gateway_config(settings: Settings, operator_token: str | None) -> GatewayConfig:
    from fedmq.wiring import decode_limits
    from gateway import GatewayConfig

    return GatewayConfig(
        operator_token=operator_token,
        default_run=settings.gateway_run,
        max_upload_bytes=settings.gateway_max_upload_bytes,
        chunk_size=settings.chunk_size,
        decode_limits=decode_limits(settings),
        register_rate_per_s=settings.gateway_register_rate_per_s,
        register_burst=settings.gateway_register_burst,
        max_device_info_bytes=settings.max_device_info_bytes,
        device_queue_expires_s=settings.device_queue_expires_s,
        metrics=settings.metrics_port is not None,
    )


def gateway(
    host: str | None = typer.Option(None, help="Listen address (default: FEDMQ_GATEWAY_HOST)"),
    port: int | None = typer.Option(None, help="Port (default: FEDMQ_GATEWAY_PORT)"),
    run: str | None = typer.Option(None, help="Default run (default: FEDMQ_GATEWAY_RUN)"),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Serve the REST gateway: the paper's API and /api/v1 on the bus (OpenAPI at /docs)."""
    import uvicorn

    from db.engine import make_engine, make_sessionmaker
    from fedmq.wiring import open_bus
    from gateway import create_app

    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    if run is not None:
        settings = settings.model_copy(update={"gateway_run": run})
    # Checked before anything opens: listening beyond loopback needs a token of one's own.
    token = operator_token.or_exit(
        settings, "gateway", host or settings.gateway_host, Console(stderr=True)
    )
    engine = make_engine(settings.database_url)
    bus = open_bus(settings)
    sessions = make_sessionmaker(engine)
    health = None
    if not settings.embedded:
        import os

        from db.health import HealthReporter
        from db.health import host as hostname
        from protocol.bus.health import summary

        health = HealthReporter(
            sessions,
            f"gateway {hostname()}-{os.getpid()}",
            "gateway",
            lambda: summary(bus.health()),
        ).start()
    try:
        config = gateway_config(settings, token)
        app = create_app(config, bus, sessions)
        # The browser device page (issue 8): served beside the API, talks to it like a device.
        from devices.browser import browser_router

        app.include_router(browser_router(config.decode_limits, config.max_upload_bytes))
        uvicorn.run(
            app,
            host=host or settings.gateway_host,
            port=port or settings.gateway_port,
            log_level=loglevel.lower(),
            access_log=False,
            # SIGTERM must stop it in bounded time; long-polling devices would hold it open.
            timeout_graceful_shutdown=SHUTDOWN_S,
        )
    finally:
        if health is not None:
            health.stop(remove=True)
        bus.close()
        engine.dispose()
