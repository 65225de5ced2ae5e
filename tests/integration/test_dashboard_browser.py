"""End to end: `fedmq dashboard` served against a live federation on RabbitMQ and Postgres
(`fedmq up`: orchestrator and worker; three `fedmq device` processes), driven by Debian's
headless Chromium through Playwright. Pressing "Autorun 3" on the Controls page must be
confirmed by the orchestrator and end in 3 more rounds done, in the database and on the page.

Screenshots of every page go to the test's folder, or to FEDMQ_DASHBOARD_SCREENSHOTS when set
(how docs/img/ is refreshed).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import RoundState
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import codec
from tests.net import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLIENTS = 3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and os.environ.get("CI", "").lower() not in {"1", "true"},
        reason="no /usr/bin/chromium (scripts/ensure-browser.sh installs it)",
    ),
]


def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _digits_run(sessions: sessionmaker[Session]) -> str:
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    with session_scope(sessions) as s:
        return create_run(
            s,
            f"browser-{uuid.uuid4().hex[:6]}",
            codec.encode(to_numpy(model), codec.Encoding.FP32),
            policy=RoundPolicy(min_clients=CLIENTS, quorum_fraction=1.0, deadline_s=60),
            strategy={"name": "fedavg"},
            train={"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
        )


class Processes:
    """Children of this test, each with its own log; stopped (SIGINT, then kill) at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, kill: bool = False) -> subprocess.Popen[bytes]:
        """``kill``: stopped with SIGKILL (devices: a clean leave takes seconds and the test
        needs nothing from it; the vhost and database are dropped anyway)."""
        log = (self.logs / f"{name}.log").open("wb")
        cmd = [sys.executable, "-m", "fedmq.cli", *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        if kill:
            self.killed.add(proc.pid)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if p.pid in self.killed else signal.SIGINT)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def federation(tmp_path: Path, amqp_url: str, pg_url: str) -> Iterator[tuple[str, str, Processes]]:
    """A live stack with three ready devices and one run; yields (run id, dashboard URL)."""
    migrations.upgrade(pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    run_id = _digits_run(sessions)
    port = free_port()
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_OPERATOR_TOKEN": secrets.token_urlsafe(24),
        "FEDMQ_DASHBOARD_REFRESH_S": "1",
        "FEDMQ_HEARTBEAT_INTERVAL_S": "2",
    }
    procs = Processes(tmp_path / "logs", env)
    try:
        # `fedmq up` for the orchestrator and the worker only: the dashboard under test is
        # the `fedmq dashboard` below, on a port of its own.
        stack = str(tmp_path / "logs" / "stack")
        procs.start("up", "up", "--logs", stack, "--no-gateway", "--no-dashboard")
        procs.start("dashboard", "dashboard", "--port", str(port))
        for k in range(CLIENTS):
            procs.start(f"device-{k}", "device", "--run", run_id, "--index", str(k),
                        "--clients", str(CLIENTS), kill=True)  # fmt: skip
        health = f"http://127.0.0.1:{port}/_stcore/health"
        _until(lambda: _answers(health), 60, "the dashboard to answer")

        def ready() -> bool:
            with session_scope(sessions) as s:
                return len(q.list_clients(s, run_id, state="ready")) == CLIENTS

        _until(ready, 90, f"{CLIENTS} ready devices")
        yield run_id, f"http://127.0.0.1:{port}", procs
    finally:
        procs.stop()
        sessions.kw["bind"].dispose()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _done(pg_url: str, run_id: str) -> int:
    engine = make_engine(pg_url)
    try:
        with session_scope(engine) as s:
            return sum(r.state == RoundState.DONE for r in q.list_rounds(s, run_id))
    finally:
        engine.dispose()


def test_autorun_3_pressed_in_chromium_runs_3_rounds(
    federation: tuple[str, str, Processes], pg_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    run_id, base, procs = federation
    shots = Path(os.environ.get("FEDMQ_DASHBOARD_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    before = _done(pg_url, run_id)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/controls?run={run_id}")
            button = page.get_by_role("button", name="Autorun 3")
            expect(button).to_be_visible(timeout=30_000)
            button.click()
            expect(page.get_by_text("autorun 3: accepted by the orchestrator")).to_be_visible(
                timeout=20_000
            )
            _until(lambda: _done(pg_url, run_id) >= before + 3, 120, "3 rounds done")
            assert _done(pg_url, run_id) == before + 3
            # The page refreshes itself (st.fragment): no reload.
            done = page.get_by_test_id("stMetric").filter(has_text="Rounds done")
            expect(done).to_contain_text(str(before + 3), timeout=15_000)
            # A command the orchestrator refuses is shown with its reason.
            page.get_by_role("button", name="Close the open round").click()
            expect(page.get_by_text("close_round: refused by the orchestrator")).to_be_visible(
                timeout=20_000
            )
            page.screenshot(path=str(shots / "dashboard-controls.png"), full_page=True)
            for name, must_show in (
                ("overview", "Global model status"),
                ("rounds", "Accuracy per round"),
                ("events", "Refused and dead-lettered"),
            ):
                page.get_by_role("link", name=name.capitalize()).click()
                expect(page.get_by_text(must_show)).to_be_visible(timeout=20_000)
                if name == "overview":
                    status = page.get_by_test_id("stMetric").filter(has_text="Current round")
                    expect(status).to_contain_text(str(before + 3), timeout=15_000)
                expect(page.get_by_test_id("stDataFrame").first).to_be_visible(timeout=20_000)
                if name == "rounds":
                    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(5, timeout=20_000)
                time.sleep(1.5)  # let the charts and tables finish drawing
                page.screenshot(path=str(shots / f"dashboard-{name}.png"), full_page=True)
        finally:
            browser.close()
    assert "Traceback" not in procs.log("dashboard"), procs.log("dashboard")
    for name in ("overview", "rounds", "events", "controls"):
        assert (shots / f"dashboard-{name}.png").read_bytes()[:4] == b"\x89PNG"
