"""The dashboard with a fleet larger than a select box should hold: the client pickers of the
Events and Controls pages list at most ``PICKER_LIMIT`` clients and find the others by name
or id (issue 16, item 6: a run of 100,000 devices; ``benchmarks/dashboard.py --fleet`` times
it at that size). AppTest against Postgres holding 250 clients."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.data import PICKER_LIMIT
from db import migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import Client, ClientState
from db.queries.bulk import insert_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

APP = str(Path(__file__).parents[2] / "dashboard" / "app.py")
FLEET = 250


@pytest.fixture
def fleet(pg_url: str) -> tuple[str, str, list[str]]:
    """A run of ``FLEET`` clients joined one after another, with events of the last one."""
    migrations.upgrade(pg_url)
    engine = make_engine(pg_url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [f"{k:04d}{'f' * 28}" for k in range(FLEET)]
    with session_scope(engine) as s:
        run_id = q.create_run(s, "fleet").id
        insert_rows(
            s,
            Client,
            (
                {
                    "id": cid,
                    "run_id": run_id,
                    "display_name": f"device-{k}",
                    "state": ClientState.READY,
                    "joined_at": t0 + timedelta(seconds=k),
                    "last_seen": t0,
                    "device_info": {},
                    "token_hash": f"{k:064d}",
                    "rounds_participated": 0,
                }
                for k, cid in enumerate(ids)
            ),
        )
        for kind in ("client.state", "update.accepted"):
            q.record_event(s, kind, run_id=run_id, client_id=ids[-1], round=1)
        q.record_event(s, "round.opened", run_id=run_id, round=1, detail={"selected": ids[:20]})
    engine.dispose()
    return pg_url, run_id, ids


def _app(url: str, run_id: str, page: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", url)
    monkeypatch.setenv("FEDMQ_BROKER_URL", "memory://")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["run"] = run_id
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_the_events_picker_lists_a_few_and_finds_any_client(
    fleet: tuple[str, str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, run_id, ids = fleet
    at = _app(url, run_id, "events", monkeypatch)
    picker = at.selectbox(key="events_client")
    assert len(picker.options) == 1 + PICKER_LIMIT  # "all" and the first joiners
    assert f"{PICKER_LIMIT} of {FLEET} clients listed" in at.caption[0].value
    log = at.dataframe[0].value
    assert len(log) == 3
    # A round's selection is counted in its cell, not listed.
    assert list(log[log["kind"] == "round.opened"]["detail"]) == ["selected=[20 items]"]

    last = ids[-1]
    at.text_input(key="events_client_find").input(f"device-{FLEET - 1}").run()
    assert at.selectbox(key="events_client").options == ["all", f"device-{FLEET - 1} ({last[:8]})"]
    at.selectbox(key="events_client").set_value(last).run()
    log = at.dataframe[0].value
    assert set(log["client"]) == {f"device-{FLEET - 1}"} and len(log) == 2

    # A new search keeps the chosen client listed (and chosen) beside the new matches.
    at.text_input(key="events_client_find").input("device-1").run()
    picker = at.selectbox(key="events_client")
    assert picker.value == last and len(picker.options) == 1 + 1 + PICKER_LIMIT
    assert not at.exception


def test_the_kick_picker_finds_a_client_by_the_start_of_its_id(
    fleet: tuple[str, str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, run_id, ids = fleet
    at = _app(url, run_id, "controls", monkeypatch)
    assert len(at.selectbox(key="kick_client").options) == PICKER_LIMIT
    at.text_input(key="kick_client_find").input(ids[200][:4]).run()
    picker = at.selectbox(key="kick_client")
    assert picker.value == ids[0]  # chosen by default before the search: kept
    assert f"device-200 ({ids[200][:8]})" in picker.options
    picker.set_value(ids[200]).run()
    assert at.selectbox(key="kick_client").value == ids[200]
