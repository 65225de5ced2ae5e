"""SIGKILL the orchestrator in the middle of a secure round's stages.

Six AMQP devices in a secure run, the orchestrator and a worker as processes. In round 1
one device vanishes after advertising its keys, so the share stage waits for it (until its
heartbeat timeout); the orchestrator is SIGKILLed there and started again. The new process
resumes the stages from the snapshot (the ``SecAggRound`` saved with the round), takes the
stage messages that queued meanwhile, writes the silent device off, and both rounds
complete with the survivors' sum; the invariant check ends the run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from db import queries as q
from db.engine import session_scope
from db.models import ClientState
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, WireConfig
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol.bus import connect
from protocol.messages import CommandAction
from simulation.simulate import SimOptions, _initial_model
from tests.faults.invariants import Invariants
from tests.integration.orchestrator_harness import harness

pytestmark = [pytest.mark.integration, pytest.mark.faults]

K = 6


@pytest.mark.timeout(300)
def test_orchestrator_sigkilled_mid_stage_resumes_the_secure_round(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    with harness(amqp_url, pg_url, tmp_path) as h:
        with session_scope(h.sessions) as s:
            h.run_id = create_run(
                s,
                "secagg-kill",
                _initial_model(SimOptions()),
                policy=RoundPolicy(
                    min_clients=K - 1, quorum_fraction=0.5, heartbeat_timeout_s=10.0
                ),
                extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
                secagg={"stage_s": 90.0},
            )
        orch = h.procs.orchestrator("orchestrator-0")
        bus = connect(amqp_url)
        wire = WireConfig(heartbeat_s=1.0, poll_s=0.05)
        clients = [
            FederatedClient(
                DeviceConfig(
                    run_id=h.run_id,
                    client_index=k,
                    num_clients=K,
                    wire=wire,
                    training=TrainingConfig(torch_threads=None),
                ),
                bus,
            )
            for k in range(K)
        ]
        clients[0].vanish = {1: "keys"}
        try:
            for c in clients:
                c.start(timeout=60)

            def ready() -> int:
                return len(h.read(lambda s: q.list_clients(s, h.run_id, ClientState.READY)))

            h.wait(lambda: ready() == K, 90, "six ready devices")
            h.command(CommandAction.AUTORUN, rounds=2)

            def sharing() -> bool:
                return any(
                    e.round == 1 and e.detail.get("stage") == "share"
                    for e in h.events("secagg.stage")
                )

            h.wait(sharing, 60, "round 1 in its share stage")
            h.procs.kill(orch)
            killed = datetime.now(UTC)
            h.procs.orchestrator("orchestrator-1")
            h.wait(
                lambda: sum(r.state == "done" for r in h.rounds()) == 2, 180, "two secure rounds"
            )
            rounds = h.rounds()
            assert [(r.number, r.received, r.attempt) for r in rounds] == [
                (1, K - 1, 1),
                (2, K - 1, 1),
            ], h.procs.output()
            # The kill did land mid-stage: round 1 left its share stage only afterwards.
            collect = [
                e.ts if e.ts.tzinfo else e.ts.replace(tzinfo=UTC)
                for e in h.events("secagg.stage")
                if e.round == 1 and e.detail["stage"] == "collect"
            ]
            assert collect and collect[0] > killed
            acked = [m for c in clients for m in c.accepted]
            assert Invariants(h.sessions, h.run_id).check(acked) == len(set(acked)) >= 2 * (K - 1)
        finally:
            for c in clients:
                c.stop()
            bus.close()
