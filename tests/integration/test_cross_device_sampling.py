"""Cross-device sampling through the real orchestrator: a run with many registered devices
selects exactly ``max_clients`` of them per round (issue 16, item 6).

The orchestrator is the real ``OrchestratorService`` on Postgres, with the in-process bus
and eager tasks (as ``fedmq simulate`` runs it), so the selection goes through the signals
consumer, the store, the projection and the aggregate task. The 300 devices are played by
the test's thread: they register and signal ready over the bus, and only the selected ones
send updates (``LightClient.send_update``), so CI does not need 300 device threads.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ClientState as RowState
from fedmq.cli import app
from fedmq.settings import Settings, get_settings
from fedmq.wiring import open_bus, orchestrator_service
from orchestrator import store
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import auth, topology
from protocol.bus import Bus
from protocol.codec import Encoding, decode, encode
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Registered,
    Signal,
    parse_as,
)
from tests.auth_helpers import register, token_of
from tests.integration.lightclient import LightClient, tiny_model
from workers.app import configure
from workers.config import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLEET = 300
CAP = 20
ROUNDS = 3


def _until(check: Callable[[], Any], what: str, seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def _register(bus: Bus, run_id: str, n: int) -> list[LightClient]:
    """``n`` devices registered and ready: every Register goes out before the first reply is
    read, so the orchestrator takes them in batches as a real fleet's would arrive."""
    devices = [LightClient(bus, run_id, f"dev-{i:03}", chunk_size=1 << 16) for i in range(n)]
    replies = []
    keys = []
    for d in devices:
        reply_key = f"r{uuid.uuid4().hex[:16]}"
        replies.append(topology.declare_device(bus, reply_key))
        reg, private = register(run_id, d.name, reply_key)
        keys.append(private)
        bus.publish(
            topology.SIGNALS_EXCHANGE, topology.signal_routing_key(reply_key), reg.to_json()
        )
    for d, queue, private in zip(devices, replies, keys, strict=True):
        got = _until(partial(bus.get, queue, timeout=0.5), f"{d.name} registered")
        got.ack()
        msg = parse_as(got.body, Registered)
        d.client_id, d.token = msg.client_id, token_of(msg, private)
        bus.delete_queue(queue)
        # No device queue: the announcements and notices it would hold are not needed here
        # (the test reads the selection from the database), and 300 queues of model chunks
        # would only cost memory.
        ready = auth.sign(
            Signal(run_id=run_id, client_id=msg.client_id, state=ClientState.READY), d.token
        )
        key = topology.signal_routing_key(msg.client_id)
        bus.publish(topology.SIGNALS_EXCHANGE, key, ready.to_json())
    return devices


@pytest.fixture
def settings(pg_url: str) -> Iterator[Settings]:
    migrations.upgrade(pg_url)
    yield get_settings().model_copy(
        update={
            "broker_url": f"memory://cap-{uuid.uuid4().hex[:8]}",
            "database_url": pg_url,
            "operator_token": SecretStr(secrets.token_urlsafe(24)),
        }
    )
    configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


@pytest.mark.parametrize("selection", ["uniform", "availability"])
def test_each_round_selects_exactly_the_cap_of_a_large_fleet(
    settings: Settings, selection: str
) -> None:
    sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings.database_url))
    policy = RoundPolicy(
        min_clients=CAP,
        max_clients=CAP,
        quorum_fraction=1.0,
        selection=selection,  # type: ignore[arg-type]
        deadline_s=120,
        heartbeat_timeout_s=600,  # the test's devices do not heartbeat
    )
    with session_scope(sessions) as s:
        run_id = create_run(s, "cap", encode(tiny_model(), Encoding.FP32), policy=policy)
    service = orchestrator_service(settings)
    service.start()
    bus = open_bus(settings)
    try:
        devices = {d.client_id: d for d in _register(bus, run_id, FLEET)}

        def ready() -> bool:
            with session_scope(sessions) as s:
                return q.count_clients_by_state(s, run_id).get(RowState.READY, 0) == FLEET

        _until(ready, f"{FLEET} ready devices")
        autorun = auth.sign(
            Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=ROUNDS),
            settings.operator_token.get_secret_value(),  # type: ignore[union-attr]
        )
        bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, autorun.to_json())

        drawn: list[set[str]] = []
        for number in range(1, ROUNDS + 1):
            selected, base_version, base = _until(
                partial(_open_round, sessions, run_id, number), f"round {number} open"
            )
            assert len(selected) == CAP
            drawn.append(selected)
            for cid in sorted(selected):
                devices[cid].send_update(number, base_version, base)
            _until(partial(_round_done, sessions, run_id, number), f"round {number} done")

        with session_scope(sessions) as s:
            rounds = [(r.number, str(r.state), r.received) for r in q.list_rounds(s, run_id)]
            opened = q.list_events(s, run_id, kinds=["round.opened"])
            states = q.count_clients_by_state(s, run_id)
        assert rounds == [(n, "done", CAP) for n in range(1, ROUNDS + 1)]
        assert [len(e.detail["selected"]) for e in opened] == [CAP] * ROUNDS
        # Fresh draws, not the same twenty every round.
        assert len(set().union(*drawn)) > CAP
        assert sum(states.values()) == FLEET
        assert not any(d.errors for d in devices.values())
    finally:
        service.stop()
        bus.close()
        sessions.kw["bind"].dispose()


def _open_round(
    sessions: sessionmaker[Session], run_id: str, number: int
) -> tuple[set[str], int, dict[str, Any]] | None:
    """The selected devices of round ``number`` and its base model, once it is open."""
    with session_scope(sessions) as s:
        r = q.get_round(s, run_id, number)
        if r is None or str(r.state) != "open" or r.base_version_id is None:
            return None
        selected = {p.client_id for p in q.list_participations(s, r.id)}
        base = q.get_model_version_by_id(s, r.base_version_id)
        assert base is not None
        return selected, base.version, decode(blobstore.get(s, base.blob_sha)).tensors


def _round_done(sessions: sessionmaker[Session], run_id: str, number: int) -> bool:
    with session_scope(sessions) as s:
        r = q.get_round(s, run_id, number)
        return r is not None and str(r.state) == "done"


# --- the run's configuration ----------------------------------------------------------------


def test_run_create_keeps_the_sampling_policy_in_the_run_and_its_snapshot(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_DATABASE_URL", db_url)
    get_settings.cache_clear()
    model = tmp_path / "model.bin"
    model.write_bytes(encode(tiny_model(), Encoding.FP32))
    create = ["run", "create", "--name", "cap", "--model", str(model), "--policy"]
    try:
        wanted = '{"min_clients": 2, "max_clients": 1000, "selection": "availability"}'
        done = CliRunner().invoke(app, [*create, wanted], catch_exceptions=False)
        assert done.exit_code == 0, done.output
        run_id = done.stdout.strip().splitlines()[-1]
        refused = CliRunner().invoke(app, [*create, '{"max_clients": 1, "min_clients": 2}'])
        assert refused.exit_code == 2
        assert "max_clients (1) must be >= min_clients (2)" in refused.output
    finally:
        get_settings.cache_clear()
    expected = RoundPolicy(min_clients=2, max_clients=1000, selection="availability")
    sessions = make_sessionmaker(make_engine(db_url))
    with session_scope(sessions) as s:
        run = q.get_run(s, run_id)
        assert run is not None
        assert RoundPolicy.from_dict(run.config["policy"]) == expected
        fed = store.load(s, run_id)
        assert fed is not None and fed.policy == expected
    sessions.kw["bind"].dispose()


def test_simulate_takes_the_cap_and_the_selection_mode(tmp_path: Path) -> None:
    args = ["--clients", "12", "--max-clients", "4", "--selection", "availability"]
    result = CliRunner().invoke(
        app,
        ["simulate", *args, "--rounds", "2", "--out", str(tmp_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["participants"] for r in rounds] == [4, 4]
