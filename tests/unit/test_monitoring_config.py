"""The monitoring files agree with the code: Grafana's dashboard is a well-formed dashboard
whose every query names a metric some fedmq process exports, every metric a fedmq process
exports has a panel, and Prometheus scrapes the services at the ports compose gives them."""

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
MONITORING_DOC = ROOT / "docs" / "monitoring.md"
# PromQL words that look like metric names but are not.
PROMQL = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "le",
    "clamp_min",
}
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
}
GRID_COLUMNS = 24


def _names(family: Any) -> set[str]:
    """The sample names a query may use for this metric family."""
    return {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}


def exported_families() -> dict[str, set[str]]:
    """Each metric family some fedmq process exports, with the sample names it has."""
    families: list[Any] = []
    wrappers = [v for v in vars(orchestrator_metrics).values() if isinstance(v, MetricWrapperBase)]
    families += [f for w in wrappers for f in w.describe()]
    families += orchestrator_metrics.StateCollector(None).describe()  # type: ignore[arg-type]
    registry = CollectorRegistry()
    worker_metrics._Metrics(registry)
    up.up_metrics(registry, [])
    families += registry.collect()
    families += gateway_families()
    return {f.name: _names(f) for f in families}


def exported() -> set[str]:
    return {n for names in exported_families().values() for n in names}


def gateway_families() -> list[Any]:
    bus = connect("memory://")
    engine = make_engine("sqlite://")
    try:
        app = create_app(
            GatewayConfig(operator_token=None, metrics=True), bus, make_sessionmaker(engine)
        )
        client = TestClient(app)
        client.get("/openapi.json")
        text = client.get("/metrics").text
        # The text format's creation timestamps parse as gauges of their own: not metrics.
        return [
            f
            for f in text_string_to_metric_families(text)
            if not (f.type == "gauge" and f.name.endswith("_created"))
        ]
    finally:
        bus.close()
        engine.dispose()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queried() -> set[str]:
    """The metric names the dashboard's queries use."""
    used = set()
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            # Drop label matchers, ranges and grouping clauses: what is left names metrics.
            without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\bby\s*\([^)]*\)", "", t["expr"])
            used |= set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)) - PROMQL
    return used


def test_the_dashboard_is_a_grafana_dashboard_with_unique_panels_and_one_datasource() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = d["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            # An expanded row holds no panels of its own: those below it, up to the next
            # row, are its panels. It spans the grid, one unit high.
            assert p["collapsed"] is False and p["panels"] == [], p["title"]
            assert p["gridPos"]["w"] == GRID_COLUMNS and p["gridPos"]["h"] == 1, p["title"]
            continue
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, p[
            "title"
        ]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"], p["title"]
            assert t["datasource"]["uid"] == uid, p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_no_two_panels_overlap_and_each_fits_the_grid() -> None:
    boxes = [(p["title"], p["gridPos"]) for p in dashboard()["panels"]]
    for title, g in boxes:
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0, title
        assert g["x"] + g["w"] <= GRID_COLUMNS, title
    for i, (a_title, a) in enumerate(boxes):
        for b_title, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{a_title!r} overlaps {b_title!r}"


def test_every_metric_a_panel_queries_is_exported_by_a_fedmq_process() -> None:
    used = queried()
    assert used, "no metric found in the dashboard's queries"
    known = exported()
    assert not used - known, f"queried but exported by nothing: {sorted(used - known)}"


def test_every_metric_a_fedmq_process_exports_has_a_panel() -> None:
    used = queried()
    unshown = sorted(name for name, samples in exported_families().items() if not samples & used)
    assert not unshown, f"exported but shown by no panel: {unshown}"


def test_the_monitoring_doc_describes_every_metric() -> None:
    doc = MONITORING_DOC.read_text()
    missing = sorted(
        name
        for name, samples in exported_families().items()
        if not any(re.search(rf"`{re.escape(s)}[`{{]", doc) for s in {name, *samples})
    )
    assert not missing, f"not described in {MONITORING_DOC.name}: {missing}"


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
