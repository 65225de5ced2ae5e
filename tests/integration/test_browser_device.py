"""The browser device end to end: the gateway (uvicorn, with the browser device page) in
front of the real orchestrator service in embedded mode (SQLite, the in-process bus, eager
tasks), one Python device and Debian's headless Chromium on ``/device``. The page loads
kernels.wasm, fetches its partition and the global model, trains in WebAssembly and uploads;
both rounds of an autorun need its update (min_clients=2) and aggregate it."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import uvicorn

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.browser import browser_router
from devices.client import FederatedClient
from devices.config import DeviceConfig, WireConfig
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from gateway import GatewayConfig, create_app
from learning.data import load_dataset, partition
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol.bus import connect
from protocol.codec import Encoding, encode
from tests.net import free_port
from workers.app import configure
from workers.config import WorkerConfig

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/ensure-browser.sh); Playwright downloads none
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and os.environ.get("CI", "").lower() not in {"1", "true"},
        reason="no /usr/bin/chromium (scripts/ensure-browser.sh installs it)",
    ),
]

K, ROUNDS = 2, 2


def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_the_browser_device_trains_in_wasm_and_its_updates_are_aggregated(
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(url)
    settings = Settings(broker_url=f"memory://browser-{uuid.uuid4().hex[:8]}", database_url=url)
    sessions = make_sessionmaker(make_engine(url))
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    with session_scope(sessions) as s:
        run_id = create_run(
            s, "browser", encode(to_numpy(model), Encoding.FP32), policy=RoundPolicy(min_clients=K)
        )
    browser_samples = len(partition("iid", data.y_train, K, seed=0)[1])
    bus = connect(settings.broker_url)
    service = orchestrator_service(settings, bus)
    service.start()
    config = GatewayConfig(operator_token="browser-test-operator", default_run=run_id)
    app = create_app(config, bus, sessions)
    app.include_router(browser_router(config.decode_limits, config.max_upload_bytes))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    serving = threading.Thread(target=server.run, name="gateway", daemon=True)
    serving.start()
    python_device = FederatedClient(
        DeviceConfig(
            run_id=run_id,
            client_index=0,
            num_clients=K,
            wire=WireConfig(heartbeat_s=0.5, poll_s=0.05),
        ),
        bus,
    ).start()

    def ready() -> bool:
        with session_scope(sessions) as s:
            return sum(c.state == "ready" for c in q.list_clients(s, run_id)) == K

    try:
        _until(lambda: server.started, 20, "the gateway")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(
                    f"http://127.0.0.1:{port}/device?run={run_id}&index=1&clients={K}"
                    "&name=browser-1"
                )
                _until(ready, 60, "both devices ready")
                with session_scope(sessions) as s:
                    step_run(s, run_id, Autorun(ROUNDS), time.time())

                def rounds_done() -> bool:
                    with session_scope(sessions) as s:
                        rs = q.list_rounds(s, run_id)
                        return len(rs) == ROUNDS and all(r.state == "done" for r in rs)

                _until(rounds_done, 90, f"{ROUNDS} rounds done")
                _until(
                    lambda: page.evaluate("document.body.dataset.accepted") == str(ROUNDS),
                    15,
                    "the page to see its updates accepted",
                )
                log = page.inner_text("#log")
                assert not errors, errors
            finally:
                browser.close()
        with session_scope(sessions) as s:
            clients = {c.display_name: c.id for c in q.list_clients(s, run_id)}
            browser_id = clients["browser-1"]
            for r in q.list_rounds(s, run_id):
                assert r.received == K
                counted = {p.client_id: p for p in q.list_participations(s, r.id) if p.num_samples}
                assert set(counted) == set(clients.values()), (r.number, counted)
                assert counted[browser_id].num_samples == browser_samples
                assert counted[browser_id].loss is not None  # the page's metrics came along
        print(log)
        assert "round 1: trained" in log and "round 2: update accepted" in log, log
    finally:
        python_device.stop()
        server.should_exit = True
        serving.join(10)
        service.stop()
        configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app
