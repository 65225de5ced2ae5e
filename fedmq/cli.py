"""The one ``fedmq`` command; each subcommand starts one part of the platform or a tool."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedmq import device_cmd, federation_cmd, gateway_cmd, operator_token
from fedmq.settings import get_settings

app = typer.Typer(
    help="fedmq: event-driven federated learning over RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()


@app.command()
def config(
    markdown: bool = typer.Option(False, help="Print README's configuration table"),
    write_readme: Path | None = typer.Option(None, help="Refresh the table in this README"),
) -> None:
    """Show the effective configuration (FEDMQ_* variables)."""
    from fedmq import config_table

    if write_readme is not None:
        write_readme.write_text(config_table.replace_in(write_readme.read_text()))
        console.print(f"updated the configuration table in {write_readme}")
        return
    if markdown:
        print(config_table.markdown())
        return
    for name, value in get_settings().model_dump().items():
        console.print(f"[bold]{name}[/bold] = {value}")


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Argument("head"),
    url: str | None = typer.Option(None, help="Database URL (default: FEDMQ_DATABASE_URL)"),
) -> None:
    """Create or migrate the schema (Alembic) to REVISION."""
    from db import migrations

    target = url or get_settings().database_url
    _ensure_sqlite_dir(target)
    migrations.upgrade(target, revision)
    console.print(f"database at revision {migrations.current(target)}")


@app.command()
def demo(
    broker: str | None = typer.Option(None, help="Broker URL (default: FEDMQ_BROKER_URL)"),
    model: str = typer.Option("resnet18", help="resnet18 or resnet50"),
    encodings: str = typer.Option(
        "fp32,bf16,fp16,int8", help="Comma-separated; topk is meant for deltas, not weights"
    ),
) -> None:
    """Send a global model over the wire in every encoding and check what arrives."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmq import demo as d

    settings = get_settings()
    weights = d.model_weights(model)
    raw = sum(a.nbytes for a in weights.values())
    url = broker or settings.broker_url
    console.print(f"bus: {url.split('@')[-1]}, chunk size {settings.chunk_size // 1024} KiB")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} chunks"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        results = d.cross(
            settings, url, weights, [e.strip() for e in encodings.split(",")], progress
        )
    d.render(results, model, raw, console)


@app.command()
def worker(
    queues: str = typer.Option("aggregate,evaluate", help="Celery queues to consume"),
    concurrency: int = typer.Option(1, help="Worker processes"),
    loglevel: str = typer.Option("INFO"),
    hostname: str | None = typer.Option(
        None, help="Celery node name (two workers on one host need two), e.g. edge@%h"
    ),
) -> None:
    """Run a Celery worker (aggregate / evaluate / edge) against FEDMQ_BROKER_URL."""
    from fedmq.wiring import worker_config
    from workers.app import configure
    from workers.pipeline.device import DeviceUnavailable, resolve_device

    settings = get_settings()
    if settings.embedded:
        raise typer.BadParameter("a worker needs a broker: set FEDMQ_BROKER_URL to amqp://...")
    try:
        # A worker set to a GPU it does not have would start and then fail every task.
        resolve_device(settings.worker_device)
    except DeviceUnavailable as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    celery_app = configure(worker_config(settings))
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            "--pool=prefork",
            *([f"--hostname={hostname}"] if hostname else []),
        ]
    )


run_app = typer.Typer(help="Runs (federations).", no_args_is_help=True)
app.add_typer(run_app, name="run")
command_app = typer.Typer(help="Operator commands to the orchestrator.", no_args_is_help=True)
app.add_typer(command_app, name="command")


@app.command()
def orchestrator(
    upgrade: bool = typer.Option(True, help="Migrate the database to head first"),
    loglevel: str = typer.Option("INFO"),
    replica_id: str | None = typer.Option(
        None, help="This replica's id (default: FEDMQ_REPLICA_ID, else host-pid-random)"
    ),
    lease_ttl_s: float | None = typer.Option(
        None, help="Run lease time (default: FEDMQ_LEASE_TTL_S)", min=0.1
    ),
    lease_renew_s: float | None = typer.Option(
        None, help="Lease renewal period (default: FEDMQ_LEASE_RENEW_S)", min=0.05
    ),
    ingest_processes: int | None = typer.Option(
        None,
        help="Child processes that store updates (default: FEDMQ_INGEST_PROCESSES)",
        min=0,
        max=64,
    ),
    ingest_only: bool = typer.Option(
        False, help="Only store updates (what an ingest process runs)", hidden=True
    ),
) -> None:
    """Run the orchestrator service (signals, updates, commands, rounds) until SIGTERM.

    Start several on one database and broker to share the work: each is a replica that
    holds its fair share of the runs (docs/architecture.md, "Replicas"). With ingest
    processes, updates are stored by child processes and use more than one core."""
    import logging

    from fedmq import metrics_http
    from fedmq.ingest_processes import IngestProcesses
    from fedmq.service_gc import tune_for_service
    from fedmq.wiring import orchestrator_service

    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {
        k: v
        for k, v in (
            ("replica_id", replica_id),
            ("lease_ttl_s", lease_ttl_s),
            ("lease_renew_s", lease_renew_s),
            ("ingest_processes", ingest_processes),
        )
        if v is not None
    }
    settings = get_settings().model_copy(update=overrides)
    operator_token.or_exit(settings, "orchestrator", None, console)
    if upgrade:
        from db import migrations

        _ensure_sqlite_dir(settings.database_url)
        migrations.upgrade(settings.database_url)
    if ingest_only or settings.ingest_processes == 0 or settings.embedded:
        service = orchestrator_service(settings, ingest_only=ingest_only)
        if not ingest_only:  # an ingest child serves none (docs/monitoring.md)
            metrics_http.serve_orchestrator(settings, service.sessions)
        tune_for_service()
        service.run_forever()
        return
    children = IngestProcesses(settings.ingest_processes).start()
    try:
        # The children store the updates; this process signals, counts and sends.
        service = orchestrator_service(settings, ingest_consumers=0)
        metrics_http.serve_orchestrator(settings, service.sessions)
        tune_for_service()
        service.run_forever()
    finally:
        children.stop()


@run_app.command("create")
def run_create(
    name: str = typer.Option(..., help="Unique run name"),
    model: Path = typer.Option(..., help="Initial model: a full-values codec blob file"),
    policy: str = typer.Option(
        "{}",
        help='RoundPolicy fields as JSON, e.g. {"max_clients": 1000, "selection": "availability"}',
    ),
    strategy: str = typer.Option('{"name": "fedavg"}', help="Aggregation strategy as JSON"),
    train: str = typer.Option("{}", help="Train config sent to devices, as JSON"),
    privacy: str = typer.Option(
        "null",
        help='Differential privacy as JSON, e.g. {"mode": "central", "noise_multiplier": 1.0, '
        '"clip_norm": 1.0, "epsilon_budget": 8}',
    ),
    secagg: str = typer.Option(
        "null",
        help='SecAgg+ secure aggregation as JSON, e.g. {"threshold": 0.4, "clip": 4.0, '
        '"stage_s": 60} ({} for the defaults): every round of the run is secure',
    ),
    run_id: str | None = typer.Option(None, help="Wire id (default: a fresh uuid)"),
) -> None:
    """Create a run with model version 0 from MODEL; prints the run id."""
    import json

    from db import migrations
    from db.engine import make_engine, session_scope
    from fedmq.wiring import privacy_config, run_configs
    from orchestrator.runs import create_run
    from orchestrator.state import RoundPolicy

    # The strategy's client settings (FedProx's mu) go into the train config the devices get.
    strategy_config, train_config = run_configs(json.loads(strategy), json.loads(train))
    try:
        dp, train_config = privacy_config(json.loads(privacy), strategy_config, train_config)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--privacy") from e
    try:
        round_policy = RoundPolicy.from_dict(json.loads(policy))
    except (ValueError, TypeError) as e:  # bad JSON, an unknown field or a bad value
        raise typer.BadParameter(str(e), param_hint="--policy") from e
    settings = get_settings()
    _ensure_sqlite_dir(settings.database_url)
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    secure = json.loads(secagg)
    if secure is not None and not isinstance(secure, dict):
        raise typer.BadParameter("an object of settings, or null", param_hint="--secagg")
    try:
        with session_scope(engine) as s:
            rid = create_run(
                s,
                name,
                model.read_bytes(),
                policy=round_policy,
                strategy=strategy_config,
                train=train_config,
                run_id=run_id,
                extra_config={"privacy": dp} if dp is not None else None,
                secagg=secure,
            )
    except ValueError as e:  # what secure rounds cannot do, or a bad secagg block
        raise typer.BadParameter(str(e), param_hint="--secagg") from e
    finally:
        engine.dispose()
    print(rid)


@run_app.command("create-split")
def run_create_split(
    name: str = typer.Option(..., help="Unique run name"),
    dataset: str = typer.Option("digits", help="The dataset the devices train on"),
    model: str = typer.Option("mlp", help="mlp, cnn or vit_tiny: cut into head, body, tail"),
    seed: int = typer.Option(0, help="Seed every side builds the model with"),
    policy: str = typer.Option("{}", help="RoundPolicy fields as JSON"),
    train: str = typer.Option("{}", help="Train config sent to devices, as JSON"),
    edge: str = typer.Option(
        "{}", help='Edge session settings as JSON, e.g. {"wait_bound_s": 0.002, "overlap": true}'
    ),
) -> None:
    """Create a split (SplitFed) run; prints the run id. Its devices run `fedmq device
    --split`, an edge worker (`fedmq worker --queues edge`, or `fedmq up --split`) trains
    the body, one session per round attempt started by the orchestrator."""
    import json

    from db import migrations
    from db.engine import make_engine, session_scope
    from fedmq.wiring import run_configs
    from orchestrator.state import RoundPolicy
    from simulation.split_run import create_split_run

    strategy_config, train_config = run_configs({"name": "fedavg"}, json.loads(train))
    try:
        round_policy = RoundPolicy.from_dict(json.loads(policy))
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e), param_hint="--policy") from e
    settings = get_settings()
    _ensure_sqlite_dir(settings.database_url)
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with session_scope(engine) as s:
        rid = create_split_run(
            s,
            name,
            dataset=dataset,
            model=model,
            seed=seed,
            policy=round_policy,
            strategy=strategy_config,
            train=train_config,
            edge=json.loads(edge),
        )
    engine.dispose()
    print(rid)


def _send_command(run: str, action: str, **kw: object) -> None:
    from fedmq.wiring import open_bus
    from protocol import auth, topology
    from protocol.bus import Unroutable
    from protocol.messages import Command, CommandAction

    settings = get_settings()
    token = operator_token.find(settings)
    if token is None:
        console.print(
            "[red]no operator token: set FEDMQ_OPERATOR_TOKEN, or run this where `fedmq up` "
            f"keeps it ({operator_token.token_path(settings)})[/red]"
        )
        raise typer.Exit(2)
    # Signed, never carrying the token: the control exchange may have other readers.
    cmd = auth.sign(Command(run_id=run, action=CommandAction(action), **kw), token)  # type: ignore[arg-type]
    try:
        with open_bus(settings) as bus:
            bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())
    except Unroutable:
        console.print(
            "[red]no orchestrator queue takes commands on this broker: start `fedmq orchestrator`"
            " (or `fedmq up`) first[/red]"
        )
        raise typer.Exit(1) from None
    console.print(f"sent {action} (message id {cmd.message_id})")


@command_app.command("autorun")
def command_autorun(rounds: int, run: str = typer.Option(..., help="Run id")) -> None:
    """Run ROUNDS rounds one after the other."""
    _send_command(run, "autorun", rounds=rounds)


@command_app.command("stop")
def command_stop(run: str = typer.Option(..., help="Run id")) -> None:
    """Stop autorun after the current round."""
    _send_command(run, "stop_autorun")


@command_app.command("open")
def command_open(run: str = typer.Option(..., help="Run id")) -> None:
    """Open one round now."""
    _send_command(run, "open_round")


@command_app.command("close")
def command_close(run: str = typer.Option(..., help="Run id")) -> None:
    """Close the open round now (if it has its quorum)."""
    _send_command(run, "close_round")


@command_app.command("kick")
def command_kick(client: str, run: str = typer.Option(..., help="Run id")) -> None:
    """Kick CLIENT out of the run for good."""
    _send_command(run, "kick", target_client=client)


@command_app.command("pause")
def command_pause(run: str = typer.Option(..., help="Run id")) -> None:
    _send_command(run, "pause")


@command_app.command("resume")
def command_resume(run: str = typer.Option(..., help="Run id")) -> None:
    _send_command(run, "resume")


app.command("device")(device_cmd.device)
app.command("gateway")(gateway_cmd.gateway)


app.command("simulate")(federation_cmd.simulate)
app.command("fleet")(federation_cmd.fleet)


@app.command()
def up(
    logs: Path = typer.Option(Path("fedmq-logs"), help="Folder for the services' logs"),
    worker_queues: str = typer.Option("aggregate,evaluate", help="Queues of the worker"),
    gateway: bool = typer.Option(True, help="Start the REST gateway"),
    dashboard: bool = typer.Option(True, help="Start the dashboard"),
    fleet: int = typer.Option(0, min=0, help="Also start a fleet of this many devices"),
    fleet_rounds: int = typer.Option(0, min=0, help="Autorun rounds the fleet starts"),
    split: bool = typer.Option(
        False,
        "--split",
        help="Split learning: also start an edge worker (queue edge); a fleet is then split",
    ),
) -> None:
    """Start the whole stack as native processes (orchestrator, worker, gateway, dashboard,
    optionally an edge worker and a device fleet); Ctrl-C stops them all."""
    from fedmq import up as stack

    options = stack.StackOptions(worker_queues, gateway, dashboard, fleet, fleet_rounds, split)
    raise typer.Exit(stack.run(get_settings(), logs, console, options))


@app.command()
def dashboard(
    host: str | None = typer.Option(None, help="Address (default: FEDMQ_DASHBOARD_HOST)"),
    port: int | None = typer.Option(None, help="Port (default: FEDMQ_DASHBOARD_PORT)"),
) -> None:
    """Serve the Streamlit dashboard: reads FEDMQ_DATABASE_URL, commands over FEDMQ_BROKER_URL."""
    import os
    import sys

    import dashboard as dash

    settings = get_settings()
    token = operator_token.or_exit(settings, "dashboard", host or settings.dashboard_host, console)
    # The app imports only protocol and db: it learns its URLs from these variables.
    env = {
        **os.environ,
        "FEDMQ_DATABASE_URL": settings.database_url,
        "FEDMQ_BROKER_URL": settings.broker_url,
        "FEDMQ_OPERATOR_TOKEN": token or "",
        "FEDMQ_DASHBOARD_REFRESH_S": str(settings.dashboard_refresh_s),
    }
    app_file = Path(dash.__file__).parent / "app.py"
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_file),
        f"--server.address={host or settings.dashboard_host}",
        f"--server.port={port or settings.dashboard_port}",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
    ]
    console.print(
        f"dashboard on http://{host or settings.dashboard_host}:{port or settings.dashboard_port}"
    )
    sys.stdout.flush()
    # Replaced, not wrapped: Ctrl-C and SIGTERM reach Streamlit itself.
    os.execve(sys.executable, argv, env)


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    app()
