"""Orchestrator benchmark (named orchestration.py: a script named orchestrator.py would shadow
the orchestrator package on sys.path) on the real RabbitMQ + Postgres (and a real Celery worker).

1. Ingest throughput: 100 clients each send a 1 MiB update (fp32 delta + zstd of a
   512x640 tensor of noise: incompressible, so ~1 MiB on the wire) for one open round;
   measured from the first publish to the last update stored (its ``update.accepted``
   event), with the orchestrator's default two ingest consumers in one process.
2. Orchestration overhead of one round: from the last update stored to the next round's
   announcement arriving on ``broadcast.<run>``, minus the aggregation task's own run
   time (``aggregate.started`` → ``aggregate.done`` events).

Clients are registered straight through the store (no 100 device threads); the updates
are real chunked messages on ``fedmq.updates``. A fresh vhost and database are made and
dropped.

    .venv/bin/python benchmarks/orchestration.py            # writes docs + JSON
    .venv/bin/python benchmarks/orchestration.py --quick    # 20 clients, prints only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from _report import machine, machine_line, publish
from _scratch import drop_scratch, make_scratch

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from orchestrator.runs import create_run
from orchestrator.service import OrchestratorService, ServiceConfig
from orchestrator.state import Autorun, ClientJoined, ClientReady, RoundPolicy
from orchestrator.store import step_run
from orchestrator.tasks import CeleryTaskRunner, result_backend_url
from protocol import auth, chunking, enveloped, topology
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.messages import UpdateMeta, parse_message

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-operator-token"


def ts(dt: datetime) -> float:
    return dt.timestamp()


def run(n_clients: int) -> dict[str, Any]:
    scratch = make_scratch("fedmq_bench")
    amqp, db_url = scratch.amqp_url, scratch.db_url
    worker: subprocess.Popen[bytes] | None = None
    service: OrchestratorService | None = None
    engine = None
    try:
        migrations.upgrade(db_url)
        env = {**os.environ, "FEDMQ_BROKER_URL": amqp, "FEDMQ_DATABASE_URL": db_url}
        env.pop("FEDMQ_RESULT_BACKEND", None)
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "workers.app", "worker"),
                *("-Q", "aggregate,evaluate", "--concurrency", "1", "--pool", "solo"),
                *("--loglevel", "WARNING", "--without-gossip", "--without-mingle"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        bus = connect(amqp)
        topology.declare(bus)
        rng = np.random.default_rng(0)
        base = {"w": rng.normal(0, 0.1, (512, 640)).astype(np.float32)}
        policy = RoundPolicy(
            min_clients=n_clients, quorum_fraction=1.0, deadline_s=600, heartbeat_timeout_s=3600
        )
        with session_scope(sessions) as s:
            run_id = create_run(s, "bench", encode(base, Encoding.FP32), policy=policy)
        # An observer of the run's broadcasts: when the next round's announcement arrives.
        obs = topology.declare_device(bus, "bench-observer", run_id)
        tokens: dict[str, str] = {}
        now = time.time()
        with session_scope(sessions) as s:
            for i in range(n_clients):
                tok = secrets.token_urlsafe(24)
                cid = q.register_client(s, run_id, f"c{i}", q.hash_token(tok))
                step_run(s, run_id, ClientJoined(cid), now)
                step_run(s, run_id, ClientReady(cid), now)
                tokens[cid] = tok
        blobs: dict[str, bytes] = {}
        for i, cid in enumerate(sorted(tokens)):
            delta = np.random.default_rng(i + 1).normal(0, 0.01, (512, 640)).astype(np.float32)
            blobs[cid] = encode(
                {"w": base["w"] + delta}, Encoding.FP32, base=base, base_version="0"
            )
        mean_mb = float(np.mean([len(b) for b in blobs.values()])) / 1e6

        tasks = CeleryTaskRunner(amqp, result_backend_url(db_url))
        service = OrchestratorService(
            bus, sessions, tasks, ServiceConfig(operator_token=TOKEN, tick_s=0.2)
        )
        service.start()
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(2), time.time())
        service._drain_soon()

        def announcement(round_number: int, timeout: float) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                d = bus.get(obs, timeout=0.5)
                if d is None:
                    continue
                d.ack()
                if chunking.is_chunk(d.headers):
                    continue
                msg = parse_message(d.body)
                if msg.type == "round" and msg.round == round_number:
                    return time.time()
            raise TimeoutError(f"no announcement of round {round_number}")

        announcement(1, 60)

        def send(cids: list[str]) -> None:
            for cid in cids:
                blob = blobs[cid]
                meta = UpdateMeta(
                    run_id=run_id,
                    client_id=cid,
                    round=1,
                    base_model_version=0,
                    num_samples=10,
                    encoding="fp32",
                    blob_sha256=hashlib.sha256(blob).hexdigest(),
                    blob_bytes=len(blob),
                )
                meta = auth.sign(meta, tokens[cid])
                env_json = meta.model_dump_json()
                for chunk in chunking.iter_chunks(blob):
                    headers = enveloped.headers(chunk, env_json)
                    bus.publish(
                        topology.UPDATES_EXCHANGE,
                        topology.update_routing_key(run_id, 1, cid),
                        chunk.data,
                        headers=headers,
                    )

        ids = sorted(tokens)
        senders = [threading.Thread(target=send, args=(ids[k::4],)) for k in range(4)]
        t0 = time.time()
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        t_published = time.time()
        t_next = announcement(2, 300)

        with session_scope(sessions) as s:
            accepted = q.list_events(s, run_id, kinds=["update.accepted"], limit=10_000)
            started = q.list_events(s, run_id, kinds=["aggregate.started"], limit=10)
            done = q.list_events(s, run_id, kinds=["aggregate.done"], limit=10)
            closed = q.list_events(s, run_id, kinds=["round.closed"], limit=10)
            rnd = q.get_round(s, run_id, 1)
            received = rnd.received if rnd else 0
            accepted_ts = [ts(e.ts) for e in accepted if e.round == 1]
            agg_start = min(ts(e.ts) for e in started)
            agg_done = max(ts(e.ts) for e in done)
            closed_ts = min(ts(e.ts) for e in closed if e.round == 1)
        assert received == n_clients, f"round 1 received {received} of {n_clients}"
        last_stored = max(accepted_ts)
        ingest_s = last_stored - t0
        agg_s = agg_done - agg_start
        overhead = t_next - last_stored - agg_s
        return {
            "clients": n_clients,
            "update_mb": mean_mb,
            "publish_s": t_published - t0,
            "ingest_s": ingest_s,
            "updates_per_s": n_clients / ingest_s,
            "mb_per_s": n_clients * mean_mb / ingest_s,
            "aggregate_task_s": agg_s,
            "last_update_to_next_broadcast_s": t_next - last_stored,
            "overhead_s": overhead,
            "close_to_task_start_s": agg_start - closed_ts,
            "task_done_to_next_broadcast_s": t_next - agg_done,
        }
    finally:
        if service is not None:
            service.stop()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, 9)
            worker.wait(timeout=10)
        if engine is not None:
            engine.dispose()
        drop_scratch(scratch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 clients; print, write nothing")
    args = parser.parse_args()
    r = run(20 if args.quick else 100)
    table = "\n".join(
        [
            "## Orchestrator (ingest and round overhead; RabbitMQ + Postgres)",
            "",
            f"{r['clients']} clients each send one {r['update_mb']:.2f} MB update (fp32 delta, "
            "one chunk) for one open round, from 4 publisher threads; one orchestrator process "
            "with two ingest consumers verifies each (SHA-256, bounded decode against the "
            "base model's spec, NaN/Inf), stores and counts it in one transaction and only "
            "then acknowledges it (a one-chunk update is not staged in `upload_chunks`; a "
            "multi-chunk one is, which writes its bytes twice).",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| ingest: first publish → last update stored | {r['ingest_s']:.2f} s |",
            f"| ingest throughput | **{r['updates_per_s']:.1f} updates/s**, "
            f"**{r['mb_per_s']:.1f} MB/s** |",
            f"| last update stored → next round's announcement received | "
            f"{r['last_update_to_next_broadcast_s']:.2f} s |",
            f"| of which the aggregate task itself ({r['clients']} updates folded) | "
            f"{r['aggregate_task_s']:.2f} s |",
            f"| **orchestration overhead of one round** (the rest) | **{r['overhead_s']:.2f} s** |",
            f"| round closed → aggregate task started (dispatch + Celery queue) | "
            f"{r['close_to_task_start_s']:.2f} s |",
            f"| aggregate done → next announcement (follow, evaluate task, open, broadcast) | "
            f"{r['task_done_to_next_broadcast_s']:.2f} s |",
            "",
            "The overhead includes the orchestrator's task polling (every 0.1 s while a task "
            "is in flight) and the "
            "evaluate task's round trip (the run has no evaluator, so it returns `skipped` at "
            "once), and the 1 MB model broadcast before the announcement.",
        ]
    )
    print(table)
    print(machine_line(machine()))
    if not args.quick:
        publish("orchestrator", table, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
