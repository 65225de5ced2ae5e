"""``fedmq device``: one device as a command (the SDK is ``devices.FederatedClient``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

from fedmq.settings import get_settings

if TYPE_CHECKING:
    from devices.config import DeviceConfig
    from devices.split_trainer import SplitTrainer
    from protocol.bus import Bus


def device(  # noqa: PLR0913 (a typer command: each option is an argument)
    run: str = typer.Option(..., help="Run id to join"),
    index: int = typer.Option(..., help="This device's partition k (0-based)"),
    clients: int = typer.Option(..., help="Number of partitions K"),
    broker: str | None = typer.Option(None, help="Broker URL (default: FEDMQ_BROKER_URL)"),
    transport: str = typer.Option("amqp", help="amqp (the broker) or http (the REST gateway)"),
    gateway: str | None = typer.Option(
        None, help="Gateway URL for --transport http (default: FEDMQ_GATEWAY_URL)"
    ),
    dataset: str = typer.Option("digits"),
    model: str = typer.Option("mlp"),
    partition: str = typer.Option("iid"),
    partition_args: str = typer.Option("{}", help="JSON, e.g. '{\"alpha\": 0.5}'"),
    encoding: str | None = typer.Option(None, help="Default: FEDMQ_ENCODING"),
    seed: int = typer.Option(0),
    name: str = typer.Option("", help="Display name (default device-<index>)"),
    rounds: int | None = typer.Option(None, help="Leave after training this many rounds"),
    slowdown: float = typer.Option(0.0, min=0, help="Simulated: extra seconds per training"),
    dropout: float = typer.Option(
        0.0, min=0, max=0.99, help="Simulated: chance of vanishing for a selected round"
    ),
    join_delay: float = typer.Option(0.0, min=0, help="Simulated: seconds before joining"),
    outage: float = typer.Option(10.0, min=0, help="Simulated: how long a dropout lasts"),
    runtime: str = typer.Option(
        "torch", help="torch, or wasm: train in the WebAssembly sandbox (MLP models only)"
    ),
    identity: Path | None = typer.Option(
        None, help="Keep the client id and token here: a restart resumes as the same client"
    ),
    orchestrator_key: str | None = typer.Option(
        None,
        help="The orchestrator's public signing key to pin (default: FEDMQ_ORCHESTRATOR_KEY; "
        "unset: the key of the first registration reply)",
    ),
    split: bool = typer.Option(
        False,
        "--split",
        help="A split run's device (SplitFed): train head and tail against each round's "
        "edge session, which holds the body (the run must be split: fedmq run create-split)",
    ),
    split_pipeline: bool = typer.Option(
        False, "--split-pipeline", help="With --split: pipeline the micro-batches"
    ),
    flower_client: str | None = typer.Option(
        None,
        help="Train with this unmodified Flower client, package.module:object (a ClientApp, "
        "NumPyClient or client_fn; needs fedmq[flower]); --model names the run's model",
    ),
) -> None:
    """Join a run as a device: register, train when selected, send updates, until Ctrl-C."""
    # Imported here: the device stack loads torch, which every other command can do without.
    from devices.config import SimulatedBehaviour, TrainingConfig
    from devices.run import run_device
    from fedmq.wiring import device_config
    from learning.split.spec import model_config

    if runtime not in ("torch", "wasm"):
        raise typer.BadParameter(f"--runtime must be torch or wasm, not {runtime!r}")
    if split and (runtime != "torch" or transport != "amqp"):
        raise typer.BadParameter("--split trains with torch over amqp (the edge link is AMQP)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)  # its INFO is every (re)connect step
    settings = get_settings()
    config = device_config(
        settings,
        run,
        index,
        clients,
        training=TrainingConfig(
            dataset=dataset,
            model=model,
            # A split run's model is built as the run's spec builds it (learning.split.spec).
            model_args=model_config(model) if split else {},
            partition=partition,
            partition_args=json.loads(partition_args),
            seed=seed,
            encoding=encoding or settings.encoding,
            runtime="wasm" if runtime == "wasm" else "torch",
            flower_client=flower_client,
        ),
        simulated=SimulatedBehaviour(
            slowdown_s=slowdown, dropout=dropout, join_delay_s=join_delay, outage_s=outage
        ),
        display_name=name,
        stop_after_rounds=rounds,
        broker_url=broker or settings.broker_url,
        transport=_transport(transport),
        gateway_url=gateway or settings.gateway_url,
        identity_file=identity,
        orchestrator_key=orchestrator_key or settings.orchestrator_key,
    )
    trainer = _split_trainer(config, split_pipeline) if split else None
    client = run_device(config, trainer=trainer)
    dropped = f", dropped out of {client.dropped_rounds}" if client.dropped_rounds else ""
    typer.echo(f"{config.name}: trained rounds {client.rounds_trained}{dropped}")


def _split_trainer(config: DeviceConfig, pipeline: bool) -> SplitTrainer:
    """A ``SplitTrainer`` whose edge link is a connection of its own to the broker."""
    from devices.split_trainer import SplitTrainer
    from protocol.bus import connect

    def link() -> Bus:
        return connect(config.wire.broker_url, config.wire.bus)

    return SplitTrainer.from_device_config(config, link, pipeline=pipeline)


def _transport(value: str) -> Literal["amqp", "http"]:
    if value not in ("amqp", "http"):
        raise typer.BadParameter(f"--transport must be amqp or http, not {value!r}")
    return "http" if value == "http" else "amqp"
