"""The orchestrator's Prometheus metrics of async runs: version steps and staleness, taken
from the effects of committed machine steps, as the round counters are."""

from __future__ import annotations

from prometheus_client import REGISTRY

from orchestrator import metrics
from orchestrator.state import (
    Federation,
    StaleDropped,
    Update,
    UpdateBuffered,
    VersionStepOpened,
)
from orchestrator.store import StepResult


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_versions_and_staleness_are_counted_from_committed_steps() -> None:
    steps_before = _value("fedmq_orchestrator_async_version_steps_total")
    folded_before = _value("fedmq_orchestrator_async_staleness_count", at="folded")
    folded_sum = _value("fedmq_orchestrator_async_staleness_sum", at="folded")
    buffered_le1 = _value("fedmq_orchestrator_async_staleness_bucket", at="buffered", le="1.0")
    dropped_before = _value("fedmq_orchestrator_async_stale_dropped_total")
    updates = (Update("a", "r1", 10), Update("b", "r2", 10), Update("c", "r3", 10))
    effects = [
        UpdateBuffered("a", 7, "r1", 10, 3, 1, 1),
        UpdateBuffered("b", 8, "r2", 10, 2, 2, 2),
        VersionStepOpened(5, 4, updates, (1, 2, 0)),
        StaleDropped("d", 9, "r4", 11, "11 versions stale"),
    ]
    metrics.observe_steps([StepResult(Federation("run"), effects)])
    assert _value("fedmq_orchestrator_async_version_steps_total") == steps_before + 1
    assert _value("fedmq_orchestrator_async_staleness_count", at="folded") == folded_before + 3
    assert _value("fedmq_orchestrator_async_staleness_sum", at="folded") == folded_sum + 3
    le1 = _value("fedmq_orchestrator_async_staleness_bucket", at="buffered", le="1.0")
    assert le1 == buffered_le1 + 1  # staleness 1 is in the le=1 bucket, 2 is not
    assert _value("fedmq_orchestrator_async_stale_dropped_total") == dropped_before + 1
