"""Turns settings into the explicit config objects the lower layers take."""

from __future__ import annotations

from fedmq.settings import Settings
from protocol.bus import Bus, BusConfig, connect
from protocol.chunking import Reassembler
from protocol.codec import DecodeLimits
from workers.config import WorkerConfig


def bus_config(s: Settings) -> BusConfig:
    return BusConfig(
        prefetch=s.prefetch,
        publish_timeout_s=s.publish_timeout_s,
        reconnect_attempts=s.reconnect_attempts,
        reconnect_backoff_s=s.reconnect_backoff_s,
        reconnect_backoff_max_s=s.reconnect_backoff_max_s,
    )


def open_bus(s: Settings, url: str | None = None) -> Bus:
    return connect(url or s.broker_url, bus_config(s))


def decode_limits(s: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_compressed_bytes=s.max_blob_bytes,
        max_decompressed_bytes=s.max_decompressed_bytes,
    )


def reassembler(s: Settings) -> Reassembler:
    return Reassembler(max_blob_bytes=s.max_blob_bytes, timeout_s=s.reassembly_timeout_s)


def worker_config(s: Settings) -> WorkerConfig:
    return WorkerConfig(
        database_url=s.database_url,
        broker_url=s.broker_url,
        result_backend=s.result_backend,
        decode_limits=decode_limits(s),
        max_aggregation_bytes=s.max_aggregation_bytes,
        task_time_limit_s=s.task_timeout_s,
        device=s.worker_device,
    )
