"""The gateway's explicit configuration (built from ``fedmq.settings`` by the composition
root; orchestrator code never reads settings itself)."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.codec import DecodeLimits
from protocol.topology import DEVICE_QUEUE_EXPIRES_S

MiB = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    # None: the gateway has no operator (every operator route answers 401).
    operator_token: str | None
    default_run: str | None = None  # the run of the paper's routes when none is named
    max_upload_bytes: int = 256 * MiB
    chunk_size: int = DEFAULT_CHUNK_SIZE  # update blobs go on the bus in chunks of this size
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    register_timeout_s: float = 15.0  # how long POST /client waits for the orchestrator
    max_wait_s: float = 30.0  # the longest long-poll a caller may ask for
    poll_interval_s: float = 0.2  # how often a long-poll re-reads the database
    model_cache: int = 4  # global model blobs kept in memory (GET /transmitter is hot)
    # Hot reads answered from memory for this long: a bearer token's client, and which model
    # version is the newest (a new version is served at most this much later).
    cache_ttl_s: float = 0.5
    # Registration limits (protocol/limits.py): per caller address, a burst then a rate
    # (a lab or NAT of devices registering at once fits the burst; an address cycling
    # through registrations does not); device_info at most this many bytes of JSON.
    register_rate_per_s: float = 1.0
    register_burst: int = 50
    max_device_info_bytes: int = 4096
    # The device queues the gateway declares for its clients expire this long after their
    # client last read them (None: never).
    device_queue_expires_s: float | None = DEVICE_QUEUE_EXPIRES_S
    # Prometheus metrics of the HTTP API at /metrics on the gateway's own port.
    metrics: bool = False
