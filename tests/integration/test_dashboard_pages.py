"""Every dashboard page, run with Streamlit's AppTest against a Postgres database that holds a
real recorded federation (3 devices, 3 rounds of digits, recorded by ``fedmq simulate``'s
embedded path pointed at Postgres). The values shown must be the database's.

The Controls page talks to a real orchestrator over the in-process bus of this process (the
app runs in the test's process under AppTest), so each command's confirmation is the
orchestrator's own ``command.result``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from rich.console import Console
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from db import blobstore
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ParticipationState
from fedmq.settings import Settings
from fedmq.wiring import open_bus, orchestrator_service
from protocol import auth, topology
from protocol.messages import Heartbeat
from simulation.simulate import SimOptions
from simulation.simulate import run as simulate
from tests.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

APP = str(Path(__file__).parents[2] / "dashboard" / "app.py")


@dataclass
class Recorded:
    database_url: str
    broker_url: str
    token: str
    run_id: str
    other_run_id: str
    sessions: sessionmaker[Session]


@pytest.fixture(scope="module")
def recorded(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    admin_url = make_url(services.database_url)
    name = f"fedmq_dash_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    out = tmp_path_factory.mktemp("recorded")
    # Two runs, so that the Rounds page has something to compare; the newer one (3 rounds)
    # is the one every page opens on.
    other = simulate(
        SimOptions(clients=3, rounds=2, seed=1, database=url, out=out / "other"),
        Settings(),
        Console(quiet=True),
    )
    result = simulate(
        SimOptions(clients=3, rounds=3, database=url, out=out / "main"),
        Settings(),
        Console(quiet=True),
    )
    # A live orchestrator on this process's in-process bus, for the Controls page; a
    # heartbeat with a wrong token gives the Events page a real refusal to show.
    token = secrets.token_urlsafe(24)
    settings = Settings(
        broker_url=f"memory://dash-{uuid.uuid4().hex[:8]}",
        database_url=url,
        operator_token=SecretStr(token),
    )
    service = orchestrator_service(settings)
    service.start()
    sessions = make_sessionmaker(make_engine(url))
    with session_scope(sessions) as ses:
        intruder = q.list_clients(ses, result.run_id)[0].id
    bus = open_bus(settings)
    bad = auth.sign(Heartbeat(run_id=result.run_id, client_id=intruder), "x" * 32)
    bus.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(intruder), bad.to_json())
    _until(lambda: _refusals(sessions, result.run_id) > 0)
    try:
        yield Recorded(url, settings.broker_url, token, result.run_id, other.run_id, sessions)
    finally:
        service.stop()
        bus.close()
        sessions.kw["bind"].dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _refusals(sessions: sessionmaker[Session], run_id: str) -> int:
    with session_scope(sessions) as s:
        return len(q.list_events(s, run_id, kinds=["auth.rejected"]))


def _until(check, seconds: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def app(recorded: Recorded, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", recorded.database_url)
    monkeypatch.setenv("FEDMQ_BROKER_URL", recorded.broker_url)
    monkeypatch.setenv("FEDMQ_OPERATOR_TOKEN", recorded.token)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception
    return at


def _open(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_overview_shows_the_global_model_status_and_the_clients_as_stored(
    app: AppTest, recorded: Recorded
) -> None:
    with session_scope(recorded.sessions) as s:
        run = q.get_run(s, recorded.run_id)
        rounds = q.list_rounds(s, recorded.run_id)
        clients = {c.id: c for c in q.list_clients(s, recorded.run_id)}
        sent = {cid: 0 for cid in clients}
        for r in rounds:
            for p in q.list_participations(s, r.id):
                sent[p.client_id] += p.bytes or 0
    assert run is not None and len(rounds) == 3
    shown = _metrics(app)
    assert shown["Current round"] == "3" == str(run.current_round)
    assert shown["Round state"] == "done"
    assert shown["Clients"] == "3"
    assert shown["Global accuracy"] == f"{100 * rounds[-1].metrics['accuracy']:.2f}%"
    table = app.dataframe[0].value
    assert len(table) == 3
    for row in table.to_dict("records"):
        c = clients[row["id"]]
        assert row["client"] == c.display_name
        assert row["rounds"] == c.rounds_participated == 3
        assert row["bytes sent"] == sent[c.id] > 0
        assert row["samples"] > 0


def test_rounds_page_shows_each_rounds_figures_as_stored(app: AppTest, recorded: Recorded) -> None:
    _open(app, "rounds")
    expected = []
    with session_scope(recorded.sessions) as s:
        for r in q.list_rounds(s, recorded.run_id):
            parts = q.list_participations(s, r.id)
            base = q.get_model_version_by_id(s, r.base_version_id)  # type: ignore[arg-type]
            assert base is not None
            counted = [p for p in parts if p.state == ParticipationState.UPDATE]
            expected.append(
                {
                    "round": r.number,
                    "accuracy": r.metrics["accuracy"],
                    "loss": r.metrics["loss"],
                    "selected": len(parts),
                    "updates": len(counted),
                    "bytes up": sum(p.bytes or 0 for p in counted),
                    "bytes down": blobstore.size(s, base.blob_sha) * len(parts),
                }
            )
    table = app.dataframe[0].value
    shown = table[list(expected[0])].to_dict("records")
    assert shown == expected
    assert [r["updates"] for r in expected] == [3, 3, 3]
    assert (table["stragglers"] == 0).all() and (table["dropouts"] == 0).all()
    assert (table["duration s"] > 0).all()
    assert len(app.get("vega_lite_chart")) == 5  # accuracy, loss, duration, bytes, people

    # Both runs side by side: each run's rows are its own rounds.
    both = [recorded.run_id, recorded.other_run_id]
    app.multiselect(key=f"compare_runs_{recorded.run_id}").set_value(both).run()
    assert not app.exception
    table = app.dataframe[0].value
    with session_scope(recorded.sessions) as s:
        for run_id in both:
            run = q.get_run(s, run_id)
            assert run is not None
            mine = table[table["run"].str.startswith(run.name)]
            stored = q.list_rounds(s, run_id)
            assert list(mine["round"]) == [r.number for r in stored]
            assert list(mine["accuracy"]) == [r.metrics["accuracy"] for r in stored]
    assert len(table) == 3 + 2


def test_events_page_filters_the_log_and_lists_refusals_with_reasons(
    app: AppTest, recorded: Recorded
) -> None:
    _open(app, "events")
    with session_scope(recorded.sessions) as s:
        newest = [e.id for e in q.list_events(s, recorded.run_id, limit=50)]
    log = app.dataframe[0].value
    assert list(log["id"]) == newest
    refused = app.dataframe[1].value
    assert list(refused["kind"]) == ["auth.rejected"]
    assert refused["reason"][0].startswith("unknown client or bad MAC")

    app.multiselect(key="events_kinds").set_value(["round.done"]).run()
    log = app.dataframe[0].value
    assert list(log["kind"]) == ["round.done"] * 3
    assert list(log["round"]) == [3, 2, 1]

    app.multiselect(key="events_kinds").set_value([]).run()
    with session_scope(recorded.sessions) as s:
        first = q.list_clients(s, recorded.run_id)[0]
        about_it = [
            e.id for e in q.list_events(s, recorded.run_id, limit=500) if e.client_id == first.id
        ]
    app.selectbox(key="events_client").set_value(first.id).run()
    log = app.dataframe[0].value
    assert list(log["id"]) == about_it and set(log["client"]) == {first.display_name}

    app.selectbox(key="events_client").set_value(None).run()
    app.number_input(key="events_round").set_value(2).run()
    with session_scope(recorded.sessions) as s:
        in_round_2 = [e.id for e in q.list_events(s, recorded.run_id, limit=500) if e.round == 2]
    assert list(app.dataframe[0].value["id"]) == in_round_2


def test_controls_confirm_what_the_orchestrator_did(app: AppTest, recorded: Recorded) -> None:
    _open(app, "controls")
    app.button(key="pause").click().run()
    assert not app.exception
    assert "pause: accepted by the orchestrator" in app.success[0].value
    assert "status paused" in app.success[0].value
    with session_scope(recorded.sessions) as s:
        run = q.get_run(s, recorded.run_id)
        assert run is not None and run.status == "paused"

    app.button(key="resume").click().run()
    assert "resume: accepted" in app.success[0].value

    app.button(key="stop_autorun").click().run()
    assert "stop_autorun: accepted" in app.success[0].value
    assert "autorun off" in app.success[0].value

    victim = app.selectbox(key="kick_client").value
    app.button(key="kick").click().run()
    assert "kick: accepted" in app.success[0].value
    with session_scope(recorded.sessions) as s:
        client = q.get_client(s, victim)
        assert client is not None and client.state == "offline"

    # Every device is gone: the orchestrator refuses a round, and the page says why.
    app.button(key="open_round").click().run()
    assert "open_round: refused by the orchestrator" in app.error[0].value


def test_overview_says_which_service_reconnects_restarts_or_went_silent(
    app: AppTest, recorded: Recorded
) -> None:
    from datetime import UTC, datetime, timedelta

    from db.queries.health import HealthRow, record_health, remove_health

    now = datetime.now(UTC)
    rows = [
        HealthRow("orchestrator r1", "orchestrator", "h", 11, "reconnecting", now, attempts=7),
        HealthRow("up worker", "supervised", "h", 12, "restarting", now, reconnects=2),
        HealthRow("worker celery@h", "worker", "h", 13, "connected"),
        HealthRow("gateway h-14", "gateway", "h", 14, "connected"),
    ]
    with session_scope(recorded.sessions) as s:
        for r in rows:
            record_health(s, r)
        record_health(s, rows[3], now=now - timedelta(minutes=5))  # its writer is gone
    try:
        at = app.run()
        assert not at.exception
        table = at.dataframe[0].value.to_dict("records")
        shown = {r["service"]: r for r in table}
        assert shown["orchestrator r1"]["state"] == "🟠 reconnecting"
        assert shown["orchestrator r1"]["attempts"] == 7
        assert shown["up worker"]["state"] == "🟠 restarting"
        assert shown["up worker"]["reconnects / restarts"] == 2
        assert shown["worker celery@h"]["state"] == "🟢 connected"
        assert shown["gateway h-14"]["state"] == "🔴 silent"
        warned = " ".join(w.value for w in at.warning)
        assert "orchestrator r1" in warned and "attempt 7" in warned
        assert "up worker" in warned and "gateway h-14" in warned
        assert "worker celery@h" not in warned
    finally:
        with session_scope(recorded.sessions) as s:
            for r in rows:
                remove_health(s, r.name)
