"""Turns settings into the explicit config objects the lower layers take."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from devices.config import (
    TRAIN_CONFIG_KEYS,
    DeviceConfig,
    SimulatedBehaviour,
    TrainingConfig,
    WireConfig,
)
from fedmq.settings import Settings
from learning.privacy import LOCAL, TRAIN_KEYS, PrivacyConfig
from learning.strategies import strategy_from_config
from orchestrator.accounts import BrokerAccounts
from orchestrator.retention import Retention
from orchestrator.service import OrchestratorService, ServiceConfig
from orchestrator.tasks import (
    CeleryTaskRunner,
    TaskRunner,
    TaskStatus,
    failure_status,
    result_backend_url,
)
from protocol.bus import Bus, BusConfig, connect
from protocol.chunking import Reassembler
from protocol.codec import DecodeLimits
from protocol.limits import RegistrationLimits
from protocol.tasks import EDGE_QUEUE
from protocol.topology import DeadLetterBounds
from workers.config import WorkerConfig
from workers.fold import folds_linearly


def bus_config(settings: Settings) -> BusConfig:
    return BusConfig(
        prefetch=settings.prefetch,
        publish_timeout_s=settings.publish_timeout_s,
        reconnect_attempts=settings.reconnect_attempts,
        reconnect_backoff_s=settings.reconnect_backoff_s,
        reconnect_backoff_max_s=settings.reconnect_backoff_max_s,
    )


def open_bus(settings: Settings, url: str | None = None) -> Bus:
    return connect(url or settings.broker_url, bus_config(settings))


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_compressed_bytes=settings.max_blob_bytes,
        max_decompressed_bytes=settings.max_decompressed_bytes,
    )


def reassembler(settings: Settings) -> Reassembler:
    return Reassembler(
        max_blob_bytes=settings.max_blob_bytes, timeout_s=settings.reassembly_timeout_s
    )


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        database_url=settings.database_url,
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        decode_limits=decode_limits(settings),
        max_aggregation_bytes=settings.max_aggregation_bytes,
        task_time_limit_s=settings.task_timeout_s,
        device=settings.worker_device,
        split_threshold=settings.aggregate_split_threshold,
        split_parts=settings.aggregate_parts,
        metrics_port=settings.metrics_port,
        metrics_host=settings.metrics_host,
    )


def device_config(
    settings: Settings,
    run_id: str,
    client_index: int,
    num_clients: int,
    *,
    training: TrainingConfig | None = None,
    simulated: SimulatedBehaviour | None = None,
    display_name: str = "",
    stop_after_rounds: int | None = None,
    **wire: Any,
) -> DeviceConfig:
    """Device ``client_index`` of ``num_clients`` in ``run_id``, reaching the platform as
    ``settings`` say (broker, gateway, heartbeat, chunk size, bus and decode limits).
    ``wire``: ``WireConfig`` fields that differ from the settings' (``broker_url``,
    ``transport``, ``poll_s``, ``identity_file``, ``orchestrator_key`` ...)."""
    link = WireConfig(
        **{
            "broker_url": settings.broker_url,
            "gateway_url": settings.gateway_url,
            "heartbeat_s": settings.heartbeat_interval_s,
            "chunk_size": settings.chunk_size,
            "bus": bus_config(settings),
            "decode_limits": decode_limits(settings),
            **wire,
        }
    )
    return DeviceConfig(
        run_id,
        client_index,
        num_clients,
        display_name=display_name,
        stop_after_rounds=stop_after_rounds,
        wire=link,
        training=training or TrainingConfig(),
        simulated=simulated or SimulatedBehaviour(),
    )


def run_configs(
    strategy: Mapping[str, Any] | None, train: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's ``strategy`` and ``train`` configs, with one source for what both need.

    The strategy is built (so a bad one is refused before the run exists) and recorded with
    all its parameters. What its clients must train with (``client_config()``: FedProx's
    mu) is written into ``train``, the config every round announces to the devices, so the
    devices train with the mu that the run and its model versions record. A ``train`` key
    that sets the same device setting (``proximal_mu`` or its alias ``mu``) to a different
    value is refused: the run would say one thing and its devices do another.
    """
    built = strategy_from_config(strategy)
    merged = dict(train or {})
    for field, value in built.client_config().items():
        aliases = [k for k, f in TRAIN_CONFIG_KEYS.items() if f == field and k in merged]
        for key in aliases:
            if merged[key] != value:
                raise ValueError(
                    f"train config {key}={merged[key]!r} disagrees with strategy "
                    f"{built.name}'s {field}={value!r}; set it in the strategy only"
                )
            del merged[key]
        merged[field] = value
    return built.config(), merged


def privacy_config(
    privacy: Mapping[str, Any] | None,
    strategy: Mapping[str, Any],
    train: Mapping[str, Any],
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A run's ``privacy`` block (checked, canonical) and its train config.

    Local mode writes what the devices need (``dp_clip_norm``, ``dp_noise_multiplier``,
    ``dp_seed``: an announcement's train config holds scalars only) into the train config
    every round announces, from the one block the run records. Central mode needs a
    weighted-mean strategy. A train config that sets those keys itself is refused: the
    run's block is the one source.
    """
    merged = dict(train)
    if any(k in merged for k in (*TRAIN_KEYS, "privacy")):
        raise ValueError("train config: set DP in the run's privacy block, not in train")
    if privacy is None:
        return None, merged
    cfg = PrivacyConfig.from_dict(privacy)
    if cfg.mode == LOCAL:
        merged.update(cfg.local().to_train())
    elif not folds_linearly(strategy_from_config(strategy)):
        raise ValueError(f"central DP needs a weighted-mean strategy, not {strategy.get('name')}")
    return cfg.to_dict(), merged


# --- the orchestrator -----------------------------------------------------------------------


class EagerTaskRunner:
    """Embedded mode's ``TaskRunner``: runs the workers' tasks in this process, at once.

    An edge session (queue ``edge``) runs on a thread of its own instead: it serves devices
    for as long as their round attempt lasts, and on the sender's thread (the orchestrator's
    outbox drain) it would hold back the very announcement its devices wait for. It runs
    the task's body, not Celery's eager mode: eager tasks of two threads share Celery's task
    stack, and the orchestrator's own tasks would fail."""

    def __init__(self, settings: Settings) -> None:
        from workers.app import configure

        self.config = worker_config(settings)
        self.app = configure(self.config)
        self._results: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def send(self, name: str, args: list[Any], task_id: str, queue: str) -> None:
        with self._lock:
            if task_id in self._results:
                return
            self._results[task_id] = ("pending", None)
        if queue == EDGE_QUEUE:
            t = threading.Thread(
                target=self._edge, args=(args, task_id), name=f"edge-{task_id}", daemon=True
            )
            self.threads.append(t)
            t.start()
            return
        try:
            result = self.app.signature(name, args=args).apply_async(task_id=task_id)
            self._results[task_id] = ("success", result.get())
        except Exception as e:  # the follower turns it into a task failure
            self._results[task_id] = ("failure", e)

    def _edge(self, args: list[Any], task_id: str) -> None:
        from workers.edge.task import run_edge_session

        try:
            self._results[task_id] = ("success", run_edge_session(self.config, *args))
        except Exception as e:
            logging.getLogger(__name__).exception("edge session %s failed", task_id)
            self._results[task_id] = ("failure", e)

    def poll(self, task_id: str) -> TaskStatus:
        state, value = self._results.get(task_id, ("pending", None))
        if state == "success":
            return TaskStatus("success", value if isinstance(value, dict) else {})
        if state == "failure":
            return failure_status(value)
        return TaskStatus("pending")


def task_runner(settings: Settings) -> TaskRunner:
    if settings.embedded:
        return EagerTaskRunner(settings)
    backend = settings.result_backend or result_backend_url(settings.database_url)
    return CeleryTaskRunner(settings.broker_url, backend)


def orchestrator_config(settings: Settings) -> ServiceConfig:
    return ServiceConfig(
        operator_token=operator_token(settings),
        decode_limits=decode_limits(settings),
        chunk_size=settings.chunk_size,
        max_message_bytes=settings.max_message_bytes,
        task_timeout_s=settings.task_timeout_s,
        reassembly_timeout_s=settings.reassembly_timeout_s,
        prefetch=settings.prefetch,
        replica_id=settings.replica_id,
        lease_ttl_s=settings.lease_ttl_s,
        lease_renew_s=settings.lease_renew_s,
        # Devices come back within their own largest reconnect delay, then heartbeat.
        outage_grace_s=settings.reconnect_backoff_max_s + 5.0,
        health_period_s=None if settings.embedded else 5.0,
        registration=RegistrationLimits(
            rate_per_s=settings.register_rate_per_s,
            burst=settings.register_burst,
            max_clients_per_run=settings.max_clients_per_run,
            max_device_info_bytes=settings.max_device_info_bytes,
        ),
        dead_letters=DeadLetterBounds(
            max_length=settings.dead_letters_max_length,
            max_bytes=settings.dead_letters_max_bytes,
            ttl_s=settings.dead_letters_ttl_s,
        ),
        retention=Retention(
            outbox_s=settings.outbox_retention_s,
            events_s=settings.events_retention_s,
            events_per_run=settings.events_max_per_run,
            processed_s=settings.processed_retention_s,
            interval_s=settings.retention_interval_s,
        ),
        auth_window_s=settings.auth_window_s,
    )


def operator_token(settings: Settings) -> str | None:
    """The orchestrator's operator token; a public example value is refused (TokenError)
    unless the bus is this process's own."""
    from fedmq import operator_token as tokens

    return (
        tokens.configured(settings)
        if settings.embedded
        else tokens.require(settings, "orchestrator")
    )


def orchestrator_service(
    settings: Settings, bus: Bus | None = None, **config: Any
) -> OrchestratorService:
    """The orchestrator of settings ``s``; ``config``: ``ServiceConfig`` fields to override
    (an ingest process's ``ingest_only``, a parent's ``ingest_consumers=0``)."""
    import dataclasses

    from db.engine import make_engine, make_sessionmaker

    # No ping per checkout (a round trip before every transaction): the orchestrator's
    # handlers run again when a connection turns out dead (OrchestratorService._patient),
    # and a failed tick is retried on the next one.
    sessions = make_sessionmaker(make_engine(settings.database_url, pool_pre_ping=False))
    return OrchestratorService(
        bus or open_bus(settings),
        sessions,
        task_runner(settings),
        dataclasses.replace(orchestrator_config(settings), **config),
        accounts=broker_accounts(settings),
    )


def broker_accounts(settings: Settings) -> BrokerAccounts | None:
    """Per-device broker users, when ``FEDMQ_BROKER_ACCOUNTS_URL`` names a management API."""
    if settings.broker_accounts_url is None or settings.embedded:
        return None
    from orchestrator.accounts import ManagementAccounts, vhost_of

    return ManagementAccounts(
        settings.broker_accounts_url.get_secret_value(), vhost_of(settings.broker_url)
    )
