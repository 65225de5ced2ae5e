"""Migrations agree with the models, on both backends, and survive a round trip with data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import Base, BlobKind, RoundState, Run, utcnow

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _diff(engine: Engine, metadata: sa.MetaData = Base.metadata) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_scripts_have_exactly_one_head() -> None:
    assert len(migrations.heads()) == 1


def test_upgraded_database_matches_the_models_exactly(db_url: str, engine: Engine) -> None:
    migrations.upgrade(db_url)

    assert migrations.current(db_url) == migrations.heads()[0]
    assert migrations.is_up_to_date(db_url)
    assert _diff(engine) == []


def test_check_constraints_match_the_model_enums(db_url: str, engine: Engine) -> None:
    # compare_metadata ignores CHECK constraints; a state added to an enum without a
    # migration would only fail at the first INSERT, so compare them here.
    migrations.upgrade(db_url)
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        enums = {
            f"ck_{table.name}_{col.type.name}": col.type.enums
            for col in table.columns
            if isinstance(col.type, sa.Enum)
        }
        reflected = {c["name"]: c["sqltext"] for c in insp.get_check_constraints(table.name)}
        assert set(reflected) == set(enums), table.name
        for name, values in enums.items():
            for value in values:
                assert f"'{value}'" in reflected[name], (table.name, value)


def test_compare_metadata_notices_a_model_that_drifted(db_url: str, engine: Engine) -> None:
    # Guards the guard: the check above would pass vacuously if compare saw nothing.
    migrations.upgrade(db_url)
    drifted = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["runs"].append_column(sa.Column("owner", sa.String(50)))

    assert _diff(engine, drifted) != []


def test_upgrade_downgrade_upgrade_leaves_the_same_schema(db_url: str, engine: Engine) -> None:
    migrations.upgrade(db_url)
    migrations.downgrade(db_url)

    assert migrations.current(db_url) is None
    assert _tables(engine) <= {"alembic_version"}

    migrations.upgrade(db_url)
    assert _diff(engine) == []


def _fill_every_table(engine: Engine) -> str:
    """One row or more in every table, the rounds <-> model_versions cycle included."""
    with session_scope(engine) as s:
        run = q.create_run(s, "kept", {"rounds": 3})
        client = q.register_client(s, run.id, "phone", q.hash_token("t"))
        model = blobstore.put(s, b"model-0", BlobKind.MODEL, chunk_size=4)
        v0, _ = q.create_model_version(s, run.id, model)
        rnd = q.create_round(s, run.id, 1, quorum=1, selected=[client], base_version_id=v0.id)
        update = blobstore.put(s, b"update-1", BlobKind.UPDATE)
        q.record_update(s, rnd.id, client, update_sha=update, num_samples=5, nbytes=8)
        q.set_round_state(s, rnd.id, RoundState.DONE)
        q.create_model_version(s, run.id, blobstore.put(s, b"m1", BlobKind.MODEL), round_id=rnd.id)
        q.record_event(s, "round.done", run_id=run.id, round=1)
        q.mark_message_processed(s, "m-1")
        return run.id


def test_data_survives_every_step_and_downgrade_works_with_data(
    db_url: str, engine: Engine
) -> None:
    migrations.upgrade(db_url)
    run_id = _fill_every_table(engine)

    # Every revision after the first: step down to it and back up, the data must stay.
    # (With one revision so far, this is the no-op upgrade of an up-to-date database.)
    script = ScriptDirectory.from_config(migrations.alembic_config())
    steps = [r.revision for r in script.walk_revisions() if r.down_revision is not None]
    for revision in steps:
        migrations.downgrade(db_url, f"{revision}-1")
        migrations.upgrade(db_url)
    migrations.upgrade(db_url)
    with session_scope(engine) as s:
        run = s.get(Run, run_id)
        assert run is not None and run.name == "kept" and run.config == {"rounds": 3}
        assert run.created_at > utcnow() - timedelta(minutes=5)

    migrations.downgrade(db_url)  # drops tables that hold rows, cycle and all
    assert _tables(engine) <= {"alembic_version"}
    migrations.upgrade(db_url)
    assert _diff(engine) == []


def test_env_reads_the_url_from_fedmq_database_url(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", sqlite_url)
    command.upgrade(migrations.alembic_config(), "head")

    assert migrations.is_up_to_date(sqlite_url)


def test_env_reads_the_url_from_x_argument(sqlite_url: str) -> None:
    cfg = migrations.alembic_config()
    cfg.cmd_opts = type("Opts", (), {"x": [f"url={sqlite_url}"]})()  # as `alembic -x url=`
    command.upgrade(cfg, "head")

    assert migrations.is_up_to_date(sqlite_url)
