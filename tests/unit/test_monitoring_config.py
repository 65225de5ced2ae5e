"""The monitoring files agree with the code: Grafana's dashboard is a well-formed dashboard
whose every query names a metric some fedmq process exports, and Prometheus scrapes the
services at the ports compose gives them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from db.engine import make_engine, make_sessionmaker
from fedmq import up
from gateway.app import create_app
from gateway.config import GatewayConfig
from orchestrator import metrics as orchestrator_metrics
from protocol.bus import connect
from workers import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedmq.json"
DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
# PromQL words that look like metric names but are not.
PROMQL = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "le"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _names(families: Any) -> set[str]:
    """The sample names a query may use for these metric families."""
    out = set()
    for f in families:
        for suffix in SUFFIXES.get(f.type, ("",)):
            out.add(f.name + suffix)
    return out


def exported() -> set[str]:
    names: set[str] = set()
    wrappers = [v for v in vars(orchestrator_metrics).values() if isinstance(v, MetricWrapperBase)]
    names |= _names(f for w in wrappers for f in w.describe())
    names |= _names(orchestrator_metrics.StateCollector(None).describe())  # type: ignore[arg-type]
    registry = CollectorRegistry()
    worker_metrics._Metrics(registry)
    up.up_metrics(registry, [])
    names |= _names(registry.collect())
    return names | gateway_names()


def gateway_names() -> set[str]:
    bus = connect("memory://")
    engine = make_engine("sqlite://")
    try:
        app = create_app(
            GatewayConfig(operator_token=None, metrics=True), bus, make_sessionmaker(engine)
        )
        client = TestClient(app)
        client.get("/openapi.json")
        text = client.get("/metrics").text
        return {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    finally:
        bus.close()
        engine.dispose()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_a_grafana_dashboard_with_unique_panels_and_one_datasource() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = d["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"], p["title"]
            assert t["datasource"]["uid"] == uid, p["title"]


def test_every_metric_a_panel_queries_is_exported_by_a_fedmq_process() -> None:
    known = exported()
    used = set()
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            # Drop label matchers, ranges and grouping clauses: what is left names metrics.
            without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\bby\s*\([^)]*\)", "", t["expr"])
            used |= set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)) - PROMQL
    assert used, "no metric found in the dashboard's queries"
    assert not used - known, f"queried but exported by nothing: {sorted(used - known)}"


def test_prometheus_scrapes_each_service_where_compose_serves_its_metrics() -> None:
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = {t for j in jobs for c in j["static_configs"] for t in c["targets"]}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("orchestrator", "worker"):
        env = services[name]["environment"]
        assert env["FEDMQ_METRICS_HOST"] == "0.0.0.0"
        assert f"{name}:{env['FEDMQ_METRICS_PORT']}" in targets
    gateway = services["gateway"]["environment"]
    assert "FEDMQ_METRICS_PORT" in gateway
    assert f"gateway:{gateway['FEDMQ_GATEWAY_PORT']}" in targets
    for job in ("prometheus", "grafana"):
        assert services[job]["profiles"] == ["monitoring"]
        assert all(p.startswith("127.0.0.1:") for p in services[job]["ports"])
