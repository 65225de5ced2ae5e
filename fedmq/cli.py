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


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    app()
