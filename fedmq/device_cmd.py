"""``fedmq device``: one device as a command (the SDK is ``devices.FederatedClient``)."""

from __future__ import annotations

import json
import logging

import typer

from devices.config import DeviceConfig, TrainSettings
from devices.run import run_device
from fedmq.settings import get_settings
from fedmq.wiring import bus_config, decode_limits


def device(
    run: str = typer.Option(..., help="Run id to join"),
    index: int = typer.Option(..., help="This device's partition k (0-based)"),
    clients: int = typer.Option(..., help="Number of partitions K"),
    broker: str | None = typer.Option(None, help="Broker URL (default: FEDMQ_BROKER_URL)"),
    dataset: str = typer.Option("digits"),
    model: str = typer.Option("mlp"),
    partition: str = typer.Option("iid"),
    partition_args: str = typer.Option("{}", help="JSON, e.g. '{\"alpha\": 0.5}'"),
    encoding: str | None = typer.Option(None, help="Default: FEDMQ_ENCODING"),
    seed: int = typer.Option(0),
    name: str = typer.Option("", help="Display name (default device-<index>)"),
    rounds: int | None = typer.Option(None, help="Leave after training this many rounds"),
) -> None:
    """Join a run as a device: register, train when selected, send updates, until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = get_settings()
    config = DeviceConfig(
        run_id=run,
        client_index=index,
        num_clients=clients,
        broker_url=broker or s.broker_url,
        display_name=name,
        dataset=dataset,
        model=model,
        partition=partition,
        partition_args=json.loads(partition_args),
        seed=seed,
        train=TrainSettings(),
        encoding=encoding or s.encoding,
        heartbeat_s=s.heartbeat_interval_s,
        chunk_size=s.chunk_size,
        stop_after_rounds=rounds,
        bus=bus_config(s),
        decode_limits=decode_limits(s),
    )
    client = run_device(config)
    typer.echo(f"{config.name}: trained rounds {client.rounds_trained}")
