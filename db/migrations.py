"""Schema migrations, callable from code (``fedmq db upgrade``) with no alembic.ini.

The plain ``alembic`` command also works: ``alembic -c <ini with script_location =
db/alembic> -x url=... upgrade head``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.engine import make_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent / "alembic"


def alembic_config(url: str | None = None) -> Config:
    """An alembic Config built in code; the URL travels as an attribute, which (unlike the
    ini option) is not %-interpolated, so passwords with % survive."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at, or None for an empty (never migrated) database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def heads() -> list[str]:
    """The head revisions of the scripts; more than one means unmerged branches."""
    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def is_up_to_date(url: str) -> bool:
    """Whether the database is at the single head (what a service checks at start-up)."""
    return [current(url)] == heads()
