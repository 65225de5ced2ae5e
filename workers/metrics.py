"""A worker's Prometheus metrics: tasks by name and outcome, their durations, retries.

Celery runs tasks in the pool's child processes (prefork), so their counts are kept the
way ``prometheus_client`` keeps a multi-process program's: each process writes its values
to a file in one directory, and the worker's main process serves the sum of them
(``MultiProcessCollector``) from ``worker_init`` on, at ``metrics_port``. The directory is
this worker's own (made fresh at start); a pool child that exits leaves its counts there,
so counters never go backwards. Eagerly (embedded mode) tasks run in the caller's process
and these metrics join its default registry, which the orchestrator's endpoint serves.

The metrics are made by ``install`` (from ``workers.app.configure``) and only when a port
is configured: a worker without one carries no metric at all.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from workers.config import WorkerConfig

log = logging.getLogger(__name__)

_TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.tasks = Counter(
            "fedmq_worker_tasks",
            "Tasks run, by name and outcome (success, failure, retry)",
            ["task", "outcome"],
            **kw,
        )
        self.seconds = Histogram(
            "fedmq_worker_task_seconds",
            "Time a task ran, by name (aggregation, evaluation, edge sessions)",
            ["task"],
            buckets=_TASK_BUCKETS,
            **kw,
        )
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()


_metrics: _Metrics | None = None
_serving: tuple[str, int] | None = None
_config: WorkerConfig | None = None


def install(config: WorkerConfig) -> None:
    """Count tasks (once per process) when ``config`` names a metrics port."""
    global _metrics, _config
    _config = config
    if config.metrics_port is None or _metrics is not None:
        return
    from celery import signals

    if config.eager:
        _metrics = _Metrics(None)  # the caller's process and registry
    else:
        _multiprocess_dir()
        _metrics = _Metrics(None)
        signals.worker_init.connect(_serve, weak=False)
        signals.worker_process_shutdown.connect(_child_gone, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
    signals.task_retry.connect(_retry, weak=False)


def _multiprocess_dir() -> None:
    """Values in files from here on (what the pool's children write and the main process
    sums). Metrics made before keep their in-memory values: only this module's are
    exported, by a collector that reads the files alone."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix=f"fedmq-worker-metrics-{os.getpid()}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()


def _serve(**_: Any) -> None:
    """In the worker's main process, before the pool starts."""
    global _serving
    if _config is None or _config.metrics_port is None or _serving is not None:
        return
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(path):  # a previous worker's files under a reused directory
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    start_http_server(_config.metrics_port, addr=_config.metrics_host, registry=registry)
    _serving = (_config.metrics_host, _config.metrics_port)
    log.info("metrics on http://%s:%d/metrics", *_serving)


def _child_gone(pid: int | None = None, **_: Any) -> None:
    multiprocess.mark_process_dead(pid or os.getpid())


def _name(sender: Any, task: Any = None) -> str:
    t = task or sender
    return str(getattr(t, "name", None) or t)


def _prerun(task_id: str | None = None, task: Any = None, sender: Any = None, **_: Any) -> None:
    if _metrics is not None and task_id:
        with _metrics.lock:
            _metrics.started[task_id] = time.perf_counter()


def _postrun(
    task_id: str | None = None,
    task: Any = None,
    sender: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if _metrics is None or not task_id:
        return
    with _metrics.lock:
        began = _metrics.started.pop(task_id, None)
    name = _name(sender, task)
    if state == "RETRY":
        return  # counted by ``_retry``
    _metrics.tasks.labels(name, "success" if state == "SUCCESS" else "failure").inc()
    if began is not None:
        _metrics.seconds.labels(name).observe(time.perf_counter() - began)


def _retry(sender: Any = None, **_: Any) -> None:
    if _metrics is not None:
        _metrics.tasks.labels(_name(sender), "retry").inc()
