"""CPU per update on the orchestrator's update path, in one process and one thread.

A whole-system load run (``load.py``) shares two cores with RabbitMQ, Postgres, the load
generator and whatever else the machine runs, so its rates swing by half from run to run.
This one measures the orchestrator's own work for a fixed workload, as process CPU time,
which moves far less with the machine's load, stage by stage:

- **store**: ``Ingest.handle_many`` over one-chunk light updates in batches of 32 (what a
  consumer's group commit gets under load): parse, verify, decode, claim, store the blob
  and the inbox row, commit, settle.
- **count**: ``counter.count`` until the inbox is empty: the run's machine stepped through
  the stored updates under its lock, participations, snapshot parts, events, notices.
- **drain**: ``Outbox.drain`` until nothing is pending: each update's notice and events
  published (onto an in-process bus, so no broker time is in the figure).

The workload: ``--devices`` clients registered and ready, round 1 open with all of them
selected, each sending one light update of ``load.py``'s model (an fp32 delta of a
4-tensor model, ~1.1 KB). Postgres is real (a scratch database); the bus is in-process.

``--old-tree PATH`` runs the same measurement on an older checkout in a subprocess (its
own code on ``PYTHONPATH``), so that old and new are compared in one run, on one machine
state.

    .venv/bin/python benchmarks/update_cpu.py --old-tree /tmp/old   # docs + JSON
    .venv/bin/python benchmarks/update_cpu.py --quick                # prints only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _models import model, trained
from _report import machine, machine_line, publish
from _scratch import drop_scratch, make_scratch
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from orchestrator.counter import count
from orchestrator.ingest import Ingest
from orchestrator.outbox import Outbox
from orchestrator.runs import create_run
from orchestrator.state import Autorun, ClientJoined, ClientReady, RoundPolicy
from orchestrator.store import StepInput, step_many, step_run
from protocol import chunking, topology
from protocol.bus import Delivery
from protocol.bus.memory import InProcessBus
from protocol.codec import DecodeLimits, Encoding, encode
from protocol.messages import UpdateMeta

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
STAGES = ("store", "count", "drain")


class _Stored(Delivery):
    """An update delivery that is already in memory: settling it costs nothing."""

    def _ack(self) -> None:
        pass

    def _nack(self, *, requeue: bool) -> None:
        raise AssertionError(f"update refused: {self.routing_key}")


class _NoTasks:
    def send(self, name: str, args: list[Any], task_id: str, queue: str) -> None:
        pass

    def poll(self, task_id: str) -> Any:
        raise NotImplementedError


def measure(n: int, big: bool = False) -> dict[str, Any]:
    """One measurement with the code importable now (this tree, or ``PYTHONPATH``'s);
    ``big``: ~1 MB updates (``load.py``'s incompressible 512x640 delta), else ~1.1 KB."""
    _as_service()
    scratch = make_scratch("fedmq_updcpu")
    engine = None
    try:
        migrations.upgrade(scratch.db_url)
        engine = make_engine(scratch.db_url)
        sessions = make_sessionmaker(engine)
        bus = InProcessBus()
        topology.declare(bus)
        outbox = Outbox(bus, sessions, _NoTasks())
        run_id, deliveries = _open_round(sessions, bus, outbox, n, big)
        ingest = Ingest(sessions, DecodeLimits(), lambda: None)
        cpu: dict[str, float] = {}

        batch = 4 if big else BATCH
        t, wall = time.process_time(), time.perf_counter()
        for i in range(0, n, batch):
            ingest.handle_many(deliveries[i : i + batch])
        cpu["store"] = time.process_time() - t
        store_wall = time.perf_counter() - wall

        t = time.process_time()
        while True:
            with session_scope(sessions) as s:
                c = count(s, run_id, time.time())
            if not c.full:
                break
        cpu["count"] = time.process_time() - t

        t = time.process_time()
        while outbox.drain():
            pass
        cpu["drain"] = time.process_time() - t

        with session_scope(sessions) as s:
            rnd = q.get_round(s, run_id, 1)
            received = rnd.received if rnd else 0
        assert received == n, f"round 1 counted {received} of {n}"
        out: dict[str, Any] = {f"{k}_ms": 1e3 * v / n for k, v in cpu.items()}
        out["total_ms"] = sum(out.values())
        out["devices"] = n
        out["store_mb_per_s"] = sum(len(d.body) for d in deliveries) / 1e6 / store_wall
        return out
    finally:
        if engine is not None:
            engine.dispose()
        drop_scratch(scratch)


def _as_service() -> None:
    """The garbage collector set as ``fedmq orchestrator`` sets it once started (trees
    from before ``fedmq.service_gc`` ran with CPython's defaults, as their service did)."""
    try:
        from fedmq.service_gc import tune_for_service
    except ImportError:
        return
    tune_for_service()


def _signed(fields: dict[str, Any], token: str) -> UpdateMeta:
    """The update envelope as the tree being measured wants it: a MAC under the token
    (protocol/auth.py, since issue 17), or the token itself (older trees)."""
    if "token" in UpdateMeta.model_fields:
        return UpdateMeta(**fields, token=token)
    from protocol import auth

    return auth.sign(UpdateMeta(**fields), token)


def _open_round(
    sessions: sessionmaker[Session], bus: InProcessBus, outbox: Outbox, n: int, big: bool
) -> tuple[str, list[Delivery]]:
    """A run with ``n`` ready clients and round 1 open for all of them (its broadcast and
    the registration events already drained); each client's update as a delivery."""
    base = model(big)
    policy = RoundPolicy(min_clients=n, quorum_fraction=1.0, deadline_s=3600)
    with session_scope(sessions) as s:
        run_id = create_run(s, "updcpu", encode(base, Encoding.FP32), policy=policy)
    tokens: dict[str, str] = {}
    with session_scope(sessions) as s:
        inputs = []
        for i in range(n):
            tok = f"token-{i:06d}-0123456789abcdef"
            cid = q.register_client(s, run_id, f"c{i}", q.hash_token(tok))
            tokens[cid] = tok
            inputs += [StepInput(ClientJoined(cid)), StepInput(ClientReady(cid))]
        step_many(s, run_id, inputs, time.time())
    for cid in tokens:
        topology.declare_device(bus, cid, run_id)
    with session_scope(sessions) as s:
        step_run(s, run_id, Autorun(1), time.time())
    while outbox.drain():
        pass
    deliveries: list[Delivery] = []
    for cid, tok in tokens.items():
        blob = trained(base, cid)
        fields = {
            "run_id": run_id,
            "client_id": cid,
            "round": 1,
            "base_model_version": 0,
            "num_samples": 10,
            "encoding": Encoding.FP32,
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
            "blob_bytes": len(blob),
        }
        meta = _signed(fields, tok)
        (chunk,) = chunking.iter_chunks(blob)
        deliveries.append(
            _Stored(
                bus,
                body=chunk.data,
                # Built by hand, not with protocol.enveloped: older trees measured here lack it.
                headers={**chunking.to_headers(chunk), "x-fedmq-envelope": meta.model_dump_json()},
                exchange=topology.UPDATES_EXCHANGE,
                routing_key=topology.update_routing_key(run_id, 1, cid),
                queue=topology.UPDATES_QUEUE,
                redelivered=False,
                message_id=meta.message_id,
            )
        )
    return run_id, deliveries


def measure_in(tree: Path, n: int, big: bool = False) -> dict[str, Any]:
    """``measure`` with the code of ``tree``, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "benchmarks")])}
    call = f"update_cpu.measure({n}, {big})"
    script = f"import json, update_cpu; print('RESULT ' + json.dumps({call}))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return dict(json.loads(line.removeprefix("RESULT ")))


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over ``runs`` (alternated with the other tree's, so that both
    meet the same moments of a shared machine's load)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(x[key] for x in runs)
    return out


def markdown(r: dict[str, Any]) -> str:
    now, old = r["now"], r.get("old")
    lines = [
        "## Update path: orchestrator CPU per update (in process)",
        "",
        f"{now['devices']:,} light updates (~1.1 KB, one chunk) through the orchestrator's "
        "update path in one thread, on a real Postgres and an in-process bus "
        "(`benchmarks/update_cpu.py`): **store** (`Ingest.handle_many`, batches of 32), "
        "**count** (the run's machine stepped through the inbox), **drain** (notices and "
        "events published). Process CPU time per update: steadier than the load run's rates "
        "on a shared machine, and the same workload for the old and the new code in one run "
        f"(medians of {r.get('repeat', 1)} runs each, old and new alternating). Each tree "
        "runs as its `fedmq orchestrator` would: one that has `fedmq.service_gc` freezes its "
        "startup heap first.",
        "",
    ]
    if old:
        lines += [
            f"| stage | {r['old_label']} (ms) | now (ms) | now / old |",
            "|---|---:|---:|---:|",
        ]
        for k in (*STAGES, "total"):
            o, v = old[f"{k}_ms"], now[f"{k}_ms"]
            lines.append(f"| {k} | {o:.3f} | {v:.3f} | {v / o:.2f} |")
    else:
        lines += ["| stage | now (ms) |", "|---|---:|"]
        lines += [f"| {k} | {now[f'{k}_ms']:.3f} |" for k in (*STAGES, "total")]
    big, old_big = r.get("now_big"), r.get("old_big")
    if big:
        lines += [
            "",
            f"{big['devices']} updates of ~1 MB (incompressible fp32 noise on a 512x640 "
            "tensor), stored 4 to a batch: the store stage's wall-clock rate (the database's "
            "writes included) and CPU per update.",
            "",
            "| 1 MB updates | " + (f"{r['old_label']} | now |" if old_big else "now |"),
            "|---|" + ("---:|---:|" if old_big else "---:|"),
        ]
        for label, key, fmt in (
            ("store MB/s (wall clock)", "store_mb_per_s", ".1f"),
            ("store CPU per update (ms)", "store_ms", ".2f"),
        ):
            cells = [format(old_big[key], fmt)] if old_big else []
            cells.append(format(big[key], fmt))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"At {now['total_ms']:.2f} ms of CPU an update, one orchestrator thread's ceiling "
        f"is about {1e3 / now['total_ms']:,.0f} updates/s before the broker's own share.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3000)
    ap.add_argument("--old-tree", type=Path, help="a checkout of the old code, measured too")
    ap.add_argument("--old-label", default="old", help="what to call the old tree in tables")
    ap.add_argument("--big", type=int, default=100, help="~1 MB updates measured too (0: no)")
    ap.add_argument("--quick", action="store_true", help="print only, write nothing")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each tree, interleaved; medians kept"
    )
    args = ap.parse_args()
    r: dict[str, Any] = {"machine": machine(), "repeat": args.repeat}
    trees = {"now": ROOT}
    if args.old_tree:
        trees = {"old": args.old_tree.resolve(), "now": ROOT}
        r["old_label"] = args.old_label
    for suffix, n, big in (("", args.devices, False), ("_big", args.big, True)):
        if n:
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
            for _ in range(args.repeat):
                for k, tree in trees.items():
                    runs[k].append(measure_in(tree, n, big))
            for k, rs in runs.items():
                r[k + suffix] = _median(rs)
    text = markdown(r)
    print(text + "\n\n" + machine_line(r["machine"]))
    if not args.quick:
        publish("update-cpu", text, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
