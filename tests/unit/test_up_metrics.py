"""`fedmq up` with FEDMQ_METRICS_PORT: its own metrics on that port, the next ports to the
orchestrator and workers, /metrics on the gateway's own port, and no port to anything
else (a fleet starting a worker of its own would take one of theirs)."""

from __future__ import annotations

import httpx
from rich.console import Console

from fedmq import up
from fedmq.settings import Settings
from tests.net import free_port


def test_up_serves_its_metrics_and_hands_each_service_its_own_port() -> None:
    base = free_port()
    started = up.services(up.StackOptions(split=True, fleet=2, fleet_rounds=1))
    env = {"FEDMQ_METRICS_PORT": "1234", "OTHER": "x"}
    restarts = up._metrics(Settings(metrics_port=base), started, env, Console(quiet=True))
    assert restarts is not None
    ports = {s.name: s.env.get("FEDMQ_METRICS_PORT") for s in started}
    assert ports == {
        "orchestrator": str(base + 1),
        "worker": str(base + 2),
        "edge-worker": str(base + 3),
        "gateway": str(base),  # on, served at the gateway's own port
        "dashboard": None,
        "fleet": None,
    }
    assert env == {"OTHER": "x"}  # the stack's environment passes no port to the rest
    restarts.labels("worker").inc()
    text = httpx.get(f"http://127.0.0.1:{base}/metrics", timeout=10).text
    assert 'fedmq_up_restarts_total{service="worker"} 1.0' in text
    assert "fedmq_up_services_running 0.0" in text


def test_without_a_metrics_port_up_serves_none_and_passes_none_on() -> None:
    started = up.services(up.StackOptions())
    env = {"FEDMQ_METRICS_PORT": "1234"}
    assert up._metrics(Settings(metrics_port=None), started, env, Console(quiet=True)) is None
    assert env == {} and all("FEDMQ_METRICS_PORT" not in s.env for s in started)
