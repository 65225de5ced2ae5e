"""The Versions page (async runs), with Streamlit's AppTest against a Postgres database that
holds a real recorded FedBuff federation (4 devices, 4 versions of digits, recorded by
``fedmq simulate --mode async``'s embedded path pointed at Postgres). The figures shown must
be the database's; a synchronous run's page says where its rounds are."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.settings import Settings
from simulation.simulate import SimOptions
from simulation.simulate import run as simulate
from tests.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

APP = str(Path(__file__).parents[2] / "dashboard" / "app.py")


@dataclass
class Recorded:
    database_url: str
    async_run: str
    sync_run: str
    sessions: sessionmaker[Session]


@pytest.fixture(scope="module")
def recorded(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    admin_url = make_url(services.database_url)
    name = f"fedmq_dashv_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    out = tmp_path_factory.mktemp("recorded")
    quiet = Console(quiet=True)
    sync = simulate(SimOptions(clients=2, rounds=1, database=url, out=out / "sync"), Settings(),
                    quiet)  # fmt: skip
    # The newer run, the one the page opens on.
    options = SimOptions(
        clients=4, rounds=4, database=url, out=out / "async", mode="async", buffer_size=2,
        concurrency=3, max_staleness=4,
    )  # fmt: skip
    result = simulate(options, Settings(), quiet)
    sessions = make_sessionmaker(make_engine(url))
    try:
        yield Recorded(url, result.run_id, sync.run_id, sessions)
    finally:
        sessions.kw["bind"].dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def app(recorded: Recorded, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", recorded.database_url)
    monkeypatch.setenv("FEDMQ_BROKER_URL", f"memory://dashv-{uuid.uuid4().hex[:8]}")
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception
    at.switch_page("views/versions.py").run()
    assert not at.exception, at.exception
    return at


def test_versions_page_shows_each_versions_figures_as_stored(
    app: AppTest, recorded: Recorded
) -> None:
    with session_scope(recorded.sessions) as s:
        run = q.get_run(s, recorded.async_run)
        assert run is not None
        start = run.created_at
        stored = []
        for r in q.list_rounds(s, recorded.async_run):
            if r.model_version_id is None:
                continue
            mv = q.get_model_version_by_id(s, r.model_version_id)
            assert mv is not None
            clients = sorted(p.client_id for p in q.received_updates(s, r.id))
            stored.append((r, mv, clients, mv.created_at))
        names = {c.id: c.display_name for c in q.list_clients(s, recorded.async_run)}
    assert len(stored) >= 4
    shown = {m.label: m.value for m in app.metric}
    assert shown["Versions"] == str(len(stored))
    staleness = [x for _, mv, _, _ in stored for x in mv.metrics["staleness"]]
    assert shown["Updates folded"] == str(len(staleness)) == str(2 * len(stored))
    assert shown["Mean staleness"] == f"{sum(staleness) / len(staleness):.2f}"
    span = (stored[-1][3] - stored[0][3]).total_seconds() / 60.0
    assert shown["Versions per minute"] == f"{(len(stored) - 1) / span:.2f}"

    table = app.dataframe[0].value.to_dict("records")
    assert [row["version"] for row in table] == [mv.version for _, mv, _, _ in stored]
    for row, (r, mv, clients, created) in zip(table, stored, strict=True):
        assert row["round"] == r.number
        assert row["accuracy"] == r.metrics["accuracy"]
        assert row["updates"] == len(clients) == 2
        assert row["staleness"] == ", ".join(str(x) for x in mv.metrics["staleness"])
        assert row["seconds"] == pytest.approx((created - start).total_seconds(), abs=0.01)

    contribution = app.dataframe[1].value
    want = Counter(c for _, _, clients, _ in stored for c in clients)
    assert dict(zip(contribution["id"], contribution["updates folded"], strict=True)) == want
    assert set(contribution["client"]) == {names[c] for c in want}
    # accuracy per version, per second; staleness histogram; contribution per device
    assert len(app.get("vega_lite_chart")) == 4


def test_a_synchronous_run_is_sent_to_the_rounds_page(app: AppTest, recorded: Recorded) -> None:
    app.sidebar.selectbox[0].set_value(recorded.sync_run).run()
    assert not app.exception
    assert "synchronous" in app.info[0].value
