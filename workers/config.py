"""The workers' explicit configuration.

Workers never import ``fedmq`` (DESIGN.md import rules): the composition root builds a
``WorkerConfig`` from its settings and hands it to ``workers.app.configure``. A worker
started directly (``celery -A workers.app worker``) reads the same ``FEDMQ_*`` variables
through ``WorkerConfig.from_env``, with the same names and defaults as fedmq's settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from db.engine import normalize_url
from protocol.codec import DecodeLimits
from workers.pipeline.device import check_device_name

MiB = 1 << 20
GiB = 1 << 30

EMBEDDED_BROKER = "memory://"
DEFAULT_DATABASE_URL = "sqlite:///.fedmq/fedmq.sqlite"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; frozen so that a task cannot change it for the next one.

    - ``result_backend``: None means the database itself (``db+<database_url>``).
    - ``max_aggregation_bytes``: the cap a non-streaming strategy (FedMedian,
      FedTrimmedAvg) must fit in; the streaming ones need 2x the model whatever k is.
    - ``max_task_starts``: a task found started this many times for one round attempt
      without finishing is failed for good instead of run again (a message that kills
      its worker every time would otherwise be redelivered forever: acks_late).
    - ``device``: where the weighted-mean strategies fold: ``cpu``; ``cuda`` or ``cuda:N``
      (a GPU must be present, or aggregation fails with a clear error); ``auto`` (the GPU
      when there is one, else the CPU). The robust strategies always combine on the CPU.
    - ``split_threshold`` / ``split_parts``: a round of more than ``split_threshold``
      updates whose strategy is a weighted mean (FedAvg family) is folded in
      ``split_parts`` parts by parallel tasks, then combined (hierarchical aggregation,
      ``workers.tasks.split``); a run may set its own in ``config["aggregation"]``.
      Parts pay off with as many aggregate worker processes as parts; with one they cost
      a float64 blob write and read per part.
    - ``test_aggregate_delay_s``: test-only; sleeps this long after each folded update so
      that a test can kill the worker mid-task. Always 0 in production.
    """

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = EMBEDDED_BROKER
    result_backend: str | None = None
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    max_aggregation_bytes: int = 4 * GiB
    task_time_limit_s: float = 600.0
    max_retries: int = 3
    max_task_starts: int = 5
    device: str = "cpu"
    split_threshold: int = 256
    split_parts: int = 2
    test_aggregate_delay_s: float = 0.0
    # Prometheus metrics (workers.metrics) at http://metrics_host:metrics_port/metrics; None:
    # none.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.max_aggregation_bytes <= 0:
            raise ValueError("max_aggregation_bytes must be > 0")
        if self.task_time_limit_s <= 0:
            raise ValueError("task_time_limit_s must be > 0")
        if self.max_task_starts < 1:
            raise ValueError("max_task_starts must be >= 1")
        if self.split_threshold < 0:
            raise ValueError("split_threshold must be >= 0")
        if self.split_parts < 1:
            raise ValueError("split_parts must be >= 1")
        if self.test_aggregate_delay_s < 0:
            raise ValueError("test_aggregate_delay_s must be >= 0")
        object.__setattr__(self, "device", check_device_name(self.device))

    @property
    def eager(self) -> bool:
        """Embedded mode: no broker, tasks run in the caller's process."""
        return self.broker_url.startswith(EMBEDDED_BROKER)

    @property
    def result_backend_url(self) -> str:
        if self.result_backend:
            return self.result_backend
        url = normalize_url(self.database_url).render_as_string(hide_password=False)
        return f"db+{url}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        """Read ``FEDMQ_*`` variables (the names of fedmq's settings), defaults otherwise.

        ``FEDMQ_MAX_BLOB_BYTES`` / ``FEDMQ_MAX_DECOMPRESSED_BYTES`` bound decoding,
        ``FEDMQ_TASK_TIMEOUT_S`` is the hard time limit, ``FEDMQ_MAX_AGGREGATION_BYTES`` the
        robust strategies' cap, ``FEDMQ_WORKER_DEVICE`` cpu, cuda, cuda:N or auto,
        ``FEDMQ_AGGREGATE_SPLIT_THRESHOLD`` / ``FEDMQ_AGGREGATE_PARTS`` hierarchical
        aggregation, and ``FEDMQ_TEST_AGGREGATE_DELAY_S`` the test-only delay.
        """
        e = os.environ if env is None else env
        default = cls()
        limits = DecodeLimits(
            max_compressed_bytes=_int(e, "FEDMQ_MAX_BLOB_BYTES", 1024 * MiB),
            max_decompressed_bytes=_int(e, "FEDMQ_MAX_DECOMPRESSED_BYTES", 2048 * MiB),
        )
        return cls(
            database_url=e.get("FEDMQ_DATABASE_URL", default.database_url),
            broker_url=e.get("FEDMQ_BROKER_URL", default.broker_url),
            result_backend=e.get("FEDMQ_RESULT_BACKEND") or None,
            decode_limits=limits,
            max_aggregation_bytes=_int(
                e, "FEDMQ_MAX_AGGREGATION_BYTES", default.max_aggregation_bytes
            ),
            task_time_limit_s=_float(e, "FEDMQ_TASK_TIMEOUT_S", default.task_time_limit_s),
            device=e.get("FEDMQ_WORKER_DEVICE", default.device),
            split_threshold=_int(e, "FEDMQ_AGGREGATE_SPLIT_THRESHOLD", default.split_threshold),
            split_parts=_int(e, "FEDMQ_AGGREGATE_PARTS", default.split_parts),
            test_aggregate_delay_s=_float(e, "FEDMQ_TEST_AGGREGATE_DELAY_S", 0.0),
            metrics_port=_int(e, "FEDMQ_METRICS_PORT", 0) or None,
            metrics_host=e.get("FEDMQ_METRICS_HOST", default.metrics_host),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
