"""Where the dashboard reads and sends: taken from the environment that ``fedmq dashboard``
sets (the same ``FEDMQ_*`` names as fedmq's settings), so that this package never imports
``fedmq`` (DESIGN.md: the dashboard imports protocol and db only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "sqlite:///.fedmq/fedmq.sqlite"
DEFAULT_BROKER_URL = "memory://"


@dataclass(frozen=True)
class DashboardConfig:
    database_url: str
    broker_url: str
    operator_token: str
    refresh_s: float
    page_size: int
    command_timeout_s: float

    @property
    def can_send(self) -> bool:
        """A bare ``memory://`` bus lives in another process: commands could not reach it.
        A named in-process bus (``memory://name``) is shared within this process (tests)."""
        return self.broker_url != DEFAULT_BROKER_URL


def from_env(env: dict[str, str] | None = None) -> DashboardConfig:
    e = os.environ if env is None else env
    return DashboardConfig(
        database_url=e.get("FEDMQ_DATABASE_URL", DEFAULT_DATABASE_URL),
        broker_url=e.get("FEDMQ_BROKER_URL", DEFAULT_BROKER_URL),
        operator_token=e.get("FEDMQ_OPERATOR_TOKEN", ""),
        refresh_s=float(e.get("FEDMQ_DASHBOARD_REFRESH_S", "3")),
        page_size=int(e.get("FEDMQ_DASHBOARD_PAGE_SIZE", "50")),
        command_timeout_s=float(e.get("FEDMQ_DASHBOARD_COMMAND_TIMEOUT_S", "10")),
    )
