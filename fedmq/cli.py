"""The one ``fedmq`` command. Subcommands are added as the parts they run land."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

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

    s = get_settings()
    weights = d.model_weights(model)
    raw = sum(a.nbytes for a in weights.values())
    url = broker or s.broker_url
    console.print(f"bus: {url.split('@')[-1]}, chunk size {s.chunk_size // 1024} KiB")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} chunks"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        results = d.cross(s, url, weights, [e.strip() for e in encodings.split(",")], progress)
    d.render(results, model, raw, console)


@app.command()
def worker(
    queues: str = typer.Option("aggregate,evaluate", help="Celery queues to consume"),
    concurrency: int = typer.Option(1, help="Worker processes"),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run a Celery worker (aggregate / evaluate / edge) against FEDMQ_BROKER_URL."""
    from fedmq.wiring import worker_config
    from workers.app import configure

    s = get_settings()
    if s.embedded:
        raise typer.BadParameter("a worker needs a broker: set FEDMQ_BROKER_URL to amqp://...")
    celery_app = configure(worker_config(s))
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            "--pool=prefork",
        ]
    )


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    app()
