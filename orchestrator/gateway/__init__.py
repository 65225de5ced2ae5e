"""The REST gateway: the second paper's API (and ``/api/v1``) on top of the bus."""

from orchestrator.gateway.app import create_app
from orchestrator.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
