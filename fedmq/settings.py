"""The one settings object. Everything is configurable through ``FEDMQ_*`` variables.

The defaults are the embedded mode: an in-process bus and a SQLite file, so that
``fedmq simulate`` needs no server. Full mode only changes URLs.
Lower layers never import this module (DESIGN.md import rules): the composition root
turns these values into the explicit config objects that protocol/, db/ and the rest take.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024

EMBEDDED_BROKER = "memory://"


class Settings(BaseSettings):
    """fedmq's configuration; see README's table (checked against this class by a test)."""

    model_config = SettingsConfigDict(env_prefix="FEDMQ_", env_file=".env", extra="ignore")

    # Connections
    broker_url: str = Field(
        EMBEDDED_BROKER,
        description="AMQP URL of RabbitMQ, or memory:// for the in-process bus (embedded mode)",
    )
    database_url: str = Field(
        "sqlite:///.fedmq/fedmq.sqlite",
        description="SQLAlchemy URL; SQLite file by default, postgresql+psycopg://... in full mode",
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; defaults to the database (db+...) when unset"
    )

    # Wire
    chunk_size: int = Field(4 * MiB, gt=0, description="Blobs larger than this travel in chunks")
    max_message_bytes: int = Field(
        1 * MiB, gt=0, description="Largest JSON envelope accepted on the bus"
    )
    max_blob_bytes: int = Field(
        1024 * MiB, gt=0, description="Largest compressed blob accepted (update or model)"
    )
    max_decompressed_bytes: int = Field(
        2048 * MiB, gt=0, description="Largest decompressed tensor payload accepted"
    )
    encoding: Literal["fp32", "bf16", "fp16", "int8", "topk"] = Field(
        "bf16", description="Default tensor encoding on the wire"
    )
    zstd_level: int = Field(3, ge=1, le=22, description="zstd compression level")

    # Bus behaviour
    prefetch: int = Field(32, gt=0, description="Unacknowledged messages per consumer")
    publish_timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for a publisher confirm"
    )
    reconnect_attempts: int = Field(
        20,
        ge=0,
        description="Reconnect attempts of one bus call (publish, get); consumers never give up",
    )
    reconnect_backoff_s: float = Field(
        0.5, gt=0, description="First reconnect delay; doubles up to reconnect_backoff_max_s"
    )
    reconnect_backoff_max_s: float = Field(10.0, gt=0, description="Largest reconnect delay")

    # Timeouts of the round
    reassembly_timeout_s: float = Field(
        300.0, gt=0, description="Give up on a chunked blob whose chunks stop arriving"
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often devices heartbeat")
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A client silent this long goes offline"
    )
    round_deadline_s: float = Field(
        300.0, gt=0, description="A round closes at this deadline if a quorum has reported"
    )
    task_timeout_s: float = Field(600.0, gt=0, description="Hard time limit of a Celery task")
    max_aggregation_bytes: int = Field(
        4096 * MiB, gt=0, description="Memory cap of robust (non-streaming) aggregation"
    )
    # The pattern is workers.pipeline.device.DEVICE_PATTERN (a unit test keeps them equal).
    worker_device: str = Field(
        "cpu",
        pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
        description="Where workers fold updates: cpu, cuda, cuda:N (error without a GPU), "
        "or auto (the GPU if there is one, else cpu)",
    )
    aggregate_split_threshold: int = Field(
        256,
        ge=0,
        description="Rounds with more updates than this (FedAvg family) are folded in "
        "parallel parts by several workers, then combined",
    )
    aggregate_parts: int = Field(
        2, ge=1, description="How many parts such a round is folded in (one task each)"
    )

    # Orchestrator replicas (several `fedmq orchestrator` on one database share the runs)
    replica_id: str | None = Field(
        None,
        max_length=64,
        description="This orchestrator's replica id; unset: host-pid-random",
    )
    lease_ttl_s: float = Field(
        5.0, gt=0, description="A run lease not renewed this long is free to take"
    )
    lease_renew_s: float = Field(
        1.0, gt=0, description="How often a replica renews its run leases and rebalances"
    )
    ingest_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Child processes `fedmq orchestrator` runs to store updates (0: its own "
        "threads do); one per spare core lets updates use more than one core",
    )

    # Bounds (issue 17): registration limits, queue expiry, dead letters, retention
    register_rate_per_s: float = Field(
        1000.0,
        gt=0,
        description="Registrations per second the orchestrator takes from one broker user "
        "(devices sharing the enrollment user share it), after register_burst",
    )
    register_burst: int = Field(
        10_000, ge=1, description="Registrations at once from one broker user (a fleet restart)"
    )
    max_clients_per_run: int = Field(
        100_000, ge=1, description="Registered clients a run takes; more are refused (429)"
    )
    max_device_info_bytes: int = Field(
        4096, ge=0, description="Largest device_info (registration metadata, as JSON) accepted"
    )
    device_queue_expires_s: float = Field(
        3600.0,
        gt=0,
        description="A device queue nobody reads for this long is deleted by the broker "
        "(the device declares it again when it comes back)",
    )
    dead_letters_max_length: int = Field(
        10_000, ge=1, description="Messages dead-letters keeps (the oldest are dropped)"
    )
    dead_letters_max_bytes: int = Field(
        256 * MiB, ge=1, description="Bytes dead-letters keeps (the oldest are dropped)"
    )
    dead_letters_ttl_s: float = Field(
        86_400.0, gt=0, description="A dead letter nobody consumed is dropped after this long"
    )
    outbox_retention_s: float = Field(
        3600.0, ge=0, description="Sent outbox rows are deleted after this long"
    )
    events_retention_s: float = Field(
        7 * 86_400.0, ge=0, description="Events older than this are deleted"
    )
    events_max_per_run: int = Field(
        100_000,
        ge=1,
        description="Events kept per run (and of no run), the newest; older ones are deleted",
    )
    processed_retention_s: float = Field(
        86_400.0, gt=0, description="Message ids kept for de-duplicating re-deliveries"
    )
    retention_interval_s: float = Field(
        60.0, gt=0, description="How often the orchestrator prunes what retention drops"
    )

    # Dashboard
    dashboard_host: str = Field("127.0.0.1", description="Address `fedmq dashboard` listens on")
    dashboard_port: int = Field(8501, gt=0, lt=65536, description="Port of `fedmq dashboard`")
    dashboard_refresh_s: float = Field(
        3.0, gt=0, description="How often the dashboard's pages refresh themselves"
    )

    # Metrics (Prometheus)
    metrics_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description=(
            "Serve Prometheus metrics at /metrics on this port (orchestrator, worker; `fedmq "
            "up` gives its services this port and the next ones, the gateway serves them on its "
            "own port); unset: no metrics"
        ),
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoints listen on")

    # Security and storage
    operator_token: SecretStr | None = Field(
        None,
        description=(
            "Secret of operator commands and routes; unset: `fedmq up` makes one (0600) in "
            "FEDMQ_DATA_DIR/operator-token, and services listening beyond loopback refuse to start"
        ),
    )
    auth_window_s: float = Field(
        900.0,
        gt=0,
        description="How far a signed message's timestamp may be from the orchestrator's clock",
    )
    data_dir: Path = Field(Path(".fedmq"), description="Where embedded mode keeps its files")
    broker_accounts_url: SecretStr | None = Field(
        None,
        description=(
            "RabbitMQ management API (http://admin:password@host:15672) the orchestrator uses "
            "to give every device its own broker user; unset: devices share one user"
        ),
    )
    device_broker_url: SecretStr | None = Field(
        None,
        description=(
            "The broker URL devices started here (`fedmq fleet`) connect with, e.g. the "
            "shared enrollment user's; unset: broker_url. `fedmq up` sets it"
        ),
    )

    # REST gateway (fedmq gateway; devices with --transport http)
    gateway_host: str = Field("127.0.0.1", description="Address the REST gateway listens on")
    gateway_port: int = Field(8080, gt=0, lt=65536, description="Port of the REST gateway")
    gateway_url: str = Field(
        "http://127.0.0.1:8080", description="Where HTTP devices reach the REST gateway"
    )
    orchestrator_key: str | None = Field(
        None,
        description="The orchestrator's public signing key (base64, logged by fedmq "
        "orchestrator) for devices to pin before registering; unset: trust the first reply's",
    )
    gateway_run: str | None = Field(
        None, description="Run of the paper's routes that name none (POST /client, autorun)"
    )
    gateway_max_upload_bytes: int = Field(
        256 * MiB, gt=0, description="Largest update a device may upload through the gateway"
    )
    gateway_register_rate_per_s: float = Field(
        1.0, gt=0, description="Registrations per second the gateway takes from one address"
    )
    gateway_register_burst: int = Field(
        50, ge=1, description="Registrations at once the gateway takes from one address"
    )

    @field_validator("worker_device", mode="before")
    @classmethod
    def _device_name(cls, value: object) -> object:
        # "CUDA" or " cuda:0 " from an environment file mean what they say.
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("memory://")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
