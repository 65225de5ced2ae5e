"""A device's config: its parts check their own fields, and the one builder fills in what
the settings say (fedmq.wiring.device_config)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from devices.config import DeviceConfig, SimulatedBehaviour, TrainingConfig, WireConfig
from fedmq.settings import Settings
from fedmq.wiring import device_config


def _settings() -> Settings:
    return Settings(
        broker_url="amqp://guest:guest@broker:5672/%2F",
        gateway_url="http://gateway:9000",
        heartbeat_interval_s=2.5,
        chunk_size=65536,
        prefetch=7,
        max_blob_bytes=12345678,
    )


def test_the_builder_takes_the_wire_from_the_settings() -> None:
    config = device_config(_settings(), "run-1", 2, 5)
    assert (config.run_id, config.client_index, config.num_clients) == ("run-1", 2, 5)
    assert config.name == "device-2"
    wire = config.wire
    assert wire.broker_url == "amqp://guest:guest@broker:5672/%2F"
    assert wire.gateway_url == "http://gateway:9000"
    assert (wire.heartbeat_s, wire.chunk_size) == (2.5, 65536)
    assert wire.bus.prefetch == 7
    assert wire.decode_limits.max_compressed_bytes == 12345678
    assert wire.transport == "amqp" and wire.orchestrator_key is None
    assert config.training == TrainingConfig() and config.simulated == SimulatedBehaviour()


def test_the_builder_applies_the_callers_parts_and_wire_changes(tmp_path: Path) -> None:
    training = TrainingConfig(dataset="digits", model="cnn", seed=3, encoding="int8")
    slow = SimulatedBehaviour(slowdown_s=1.5, dropout=0.2)
    config = device_config(
        _settings(),
        "run-1",
        0,
        1,
        training=training,
        simulated=slow,
        display_name="edge-box",
        stop_after_rounds=4,
        broker_url="memory://fleet",
        poll_s=1.0,
        identity_file=tmp_path / "id.json",
    )
    assert config.training is training and config.simulated is slow
    assert (config.name, config.stop_after_rounds) == ("edge-box", 4)
    assert (config.wire.broker_url, config.wire.poll_s) == ("memory://fleet", 1.0)
    assert config.wire.identity_file == tmp_path / "id.json"
    assert config.wire.heartbeat_s == 2.5  # the settings' value where the caller names none


def test_the_builder_refuses_a_wire_field_that_does_not_exist() -> None:
    with pytest.raises(TypeError, match="heartbeat"):
        device_config(_settings(), "run-1", 0, 1, heartbeat=1.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DeviceConfig("r", 3, 3), "client_index"),
        (lambda: WireConfig(transport="http"), "gateway_url"),
        (lambda: WireConfig(poll_s=0), "positive"),
        (lambda: WireConfig(orchestrator_key="not a key"), "orchestrator_key"),
        (lambda: TrainingConfig(encoding="fp8"), "fp8"),
        (lambda: TrainingConfig(topk_fraction=0), "topk_fraction"),
        (lambda: TrainingConfig(runtime="wasm", flower_client="a.b:c"), "Flower"),
        (lambda: SimulatedBehaviour(outage_s=-1), "outage_s"),
        (lambda: SimulatedBehaviour(dropout=1.0), "dropout"),
    ],
)
def test_each_part_refuses_its_own_bad_fields(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_only_int8_and_topk_are_lossy() -> None:
    assert TrainingConfig(encoding="int8").lossy and TrainingConfig(encoding="topk").lossy
    assert not TrainingConfig(encoding="bf16").lossy
