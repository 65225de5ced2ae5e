"""The REST gateway: the second paper's API (and ``/api/v1``) on top of the bus."""

from gateway.app import create_app
from gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
