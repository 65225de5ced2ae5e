"""`fedmq up` started bare is not controllable with a token printed in fedmq's source
(issue 17, finding 2): it generates its own (0600, reused), and the old constant is refused
by the gateway and on the control queue."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from orchestrator.runs import create_run
from protocol import auth, topology
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.messages import Command, CommandAction
from tests.integration.lightclient import tiny_model
from tests.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OLD_CONSTANT = "fedmq-dev-operator-token"  # the default before issue 17


def _wait(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _http(method: str, url: str, token: str) -> int:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def _up(env: dict[str, str], logs: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    with out.open("wb") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmq.cli",
                "up",
                "--logs",
                str(logs),
                "--no-dashboard",
                *extra,
            ],
            env={**env, "COLUMNS": "300"},
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_up_without_a_token_makes_its_own_and_refuses_the_old_constant(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    migrations.upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        run_id = create_run(s, "secure", encode(tiny_model(), Encoding.FP32))
    port = free_port()
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "FEDMQ_OPERATOR_TOKEN"}
    env |= {
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_GATEWAY_PORT": str(port),
        "FEDMQ_DATA_DIR": str(state),
    }
    out = tmp_path / "up.out"
    proc = _up(env, tmp_path / "logs", out)
    bus = connect(amqp_url)
    try:
        _wait(lambda: "generated a new operator token in" in out.read_text(), 60, "the token")
        path = state / "operator-token"
        assert str(path.resolve()) in out.read_text().replace("\n", "")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32 and token != OLD_CONSTANT

        # The gateway: the old constant is no operator (nor anyone else).
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _http("GET", f"{base}/docs", "x") == 200, 90, "the gateway")
        assert _http("POST", f"{base}/client/autorun/3?run_id={run_id}", OLD_CONSTANT) == 401
        assert _http("DELETE", f"{base}/client/autorun?run_id={run_id}", OLD_CONSTANT) == 401

        # The control queue: the old wire (the token in the body) and a MAC under the old
        # constant are both refused with a reason, and nothing changes.
        old_wire = {
            **json.loads(Command(run_id=run_id, action=CommandAction.PAUSE).to_json()),
            "operator_token": OLD_CONSTANT,
        }
        old_wire.pop("mac")
        forged = auth.sign(Command(run_id=run_id, action=CommandAction.PAUSE), OLD_CONSTANT)
        genuine = auth.sign(Command(run_id=run_id, action=CommandAction.STOP_AUTORUN), token)
        _wait(lambda: _has_consumer(amqp_url), 90, "the orchestrator's control consumer")
        for body in (json.dumps(old_wire).encode(), forged.to_json(), genuine.to_json()):
            bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, body)

        def results() -> list[dict]:
            with session_scope(sessions) as s:
                return [dict(e.detail) for e in q.list_events(s, kinds=["command.result"])]

        _wait(lambda: len(results()) >= 3, 60, "three command results")
        by_reason = {str(r["reason"]): r["accepted"] for r in results()}
        assert by_reason.get("bad operator MAC") is False, by_reason
        assert any("operator_token" in r and a is False for r, a in by_reason.items()), by_reason
        assert any(a for a in by_reason.values()), by_reason  # the generated token works
        with session_scope(sessions) as s:
            run = q.get_run(s, run_id)
            assert run is not None and str(run.status) != "paused"

        # The gateway takes the generated token as the operator's.
        assert _http("DELETE", f"{base}/client/autorun?run_id={run_id}", token) == 202
    finally:
        _stop(proc)
        bus.close()
        engine.dispose()
    assert proc.returncode == 0, out.read_text()

    # A second start reuses the token (and says so).
    again = tmp_path / "again.out"
    proc = _up(env, tmp_path / "logs", again, "--no-gateway")
    try:
        _wait(lambda: "operator token from" in again.read_text(), 60, "the second start")
    finally:
        _stop(proc)
    assert path.read_text().strip() == token


def _has_consumer(amqp_url: str) -> bool:
    from urllib.parse import unquote, urlsplit

    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    done = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "consumers"],
        capture_output=True,
        text=True,
        check=False,
    )
    return any(
        line.split("\t")[0] == topology.CONTROL_QUEUE and line.split("\t")[-1] not in ("", "0")
        for line in done.stdout.splitlines()
    )
