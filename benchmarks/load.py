"""Load: 1,000 light simulated devices in one round on the real RabbitMQ + Postgres, with the
orchestrator and a Celery worker as their own processes (``fedmq orchestrator``, ``celery``),
then 100 devices sending ~1 MB updates in one round (fresh processes, vhost and database).

Every device goes through the wire protocol: ``Register`` on ``fedmq.signals`` (all with one
reply key, so one queue collects the ``Registered`` answers and their tokens), a ``ready``
signal, then, once autorun opens round 1 with all of them selected, one update. A light
update is an fp32 delta of a 4-tensor model (~0.6 KB, one chunk); a big one is an fp32 delta
of noise on a 512x640 tensor (incompressible: ~1 MB, encoded before the clock starts, sent
as one chunk since the default chunk size is 4 MiB). Publishing runs on 4 threads.

Measured: messages per second per phase (first publish -> last one in the database),
signal-to-database latency (a device's publish time -> the ``last_seen`` the orchestrator
wrote when it processed the ``ready`` signal; same host clock), update-to-database latency
(publish -> the participation's ``received_at``), MB/s of updates, the orchestrator's peak
resident memory (``VmHWM``), the load average while it ran, and loss: every update sent must
be in exactly one participation row and the round must close with all of them and aggregate.

    .venv/bin/python benchmarks/load.py              # 1,000 + 250 light, 100 big; docs + JSON
    .venv/bin/python benchmarks/load.py --devices 100 --quick --compare 0 --big 0  # prints
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _models import model, trained
from _report import machine, machine_line, publish
from _scratch import drop_scratch, make_scratch
from floor import measure as measure_floor
from sqlalchemy import func, select

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Client, Participation, ParticipationState, ProcessedMessage
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import auth, chunking, enveloped, sealing, topology
from protocol.bus import Batching, Bus, Delivery, Outgoing, connect
from protocol.codec import Encoding, encode
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Heartbeat,
    Register,
    Registered,
    Signal,
    UpdateMeta,
    parse_as,
    registered_context,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "load-operator-token-0123456789"
REPLY_KEY = "loadreplies"
THREADS = 4
# Messages per AMQP transaction from the load generator.
PER_TX = 50
# Offered signal rates of the latency sweep, as fractions of the burst's measured rate.
SWEEP = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
IMG = ROOT / "docs" / "img" / "load_latency.png"

# The committed figures of the previous change (docs/benchmarks.md before this one), for the
# text only: the table compares with the old code run in the same run (--old-tree).
PREVIOUS = {"date": "2026-11-29 22:05 UTC", "messages_per_s": 28, "devices": 1000}


class LoadAverage:
    """The 1-minute load average every few seconds while a scenario runs (the machine is
    shared: a busy neighbour shows here)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadAverage:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {
            "load_avg_1m_start": self.samples[0],
            "load_avg_1m_mean": float(np.mean(self.samples)),
            "load_avg_1m_max": max(self.samples),
            "load_avg_1m_end": self.samples[-1],
        }


def publish_all(bus: Bus, make: Any, items: list[Any]) -> dict[Any, float]:
    """Publish ``make(item) -> Outgoing`` for every item from ``THREADS`` threads, in AMQP
    transactions of ``PER_TX`` (the generator must outrun the orchestrator); the time each
    item's transaction started, by item."""
    sent: dict[Any, float] = {}

    def one_thread(k: int) -> None:
        mine = items[k::THREADS]
        for i in range(0, len(mine), PER_TX):
            part = mine[i : i + PER_TX]
            now = time.time()
            bus.publish_many([make(x) for x in part])
            sent.update(dict.fromkeys(part, now))

    threads = [threading.Thread(target=one_thread, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def offered_load(
    bus: Bus, make: Any, ids: list[str], rate: float, seconds: float
) -> dict[str, float]:
    """Publish ``make(client_id) -> (message_id, Outgoing)`` at ``rate`` per second, spread
    over ``seconds`` in ticks of 20 ms (not one burst), cycling through ``ids``; the send
    time of each message id."""
    sent: dict[str, float] = {}
    tick = 0.02
    start = time.time()
    total = int(rate * seconds)
    done = k = 0
    while done < total:
        target = min(total, round(rate * tick * (k + 1)))
        if target > done:
            batch = [make(ids[i % len(ids)]) for i in range(done, target)]
            now = time.time()
            bus.publish_many([m for _, m in batch])
            sent.update({mid: now for mid, _ in batch})
            done = target
        k += 1
        time.sleep(max(0.0, start + k * tick - time.time()))
    return sent


def sweep(
    bus: Bus, sessions: Any, make: Any, ids: list[str], max_rate: float, seconds: float = 5.0
) -> list[dict[str, float]]:
    """Signal → database latency and throughput at offered rates around ``max_rate``. A
    signal is in the database once its message id is in ``processed_messages`` (written in
    the transaction that applied it; its ``ts`` is taken just before that commit)."""
    points = []
    for frac in SWEEP:
        rate = max(10.0, frac * max_rate)
        sent = offered_load(bus, make, ids, rate, seconds)
        keys = list(sent)

        def stored(keys: list[str] = keys) -> dict[str, float]:
            with session_scope(sessions) as s:
                rows = s.execute(
                    select(ProcessedMessage.message_id, ProcessedMessage.ts).where(
                        ProcessedMessage.message_id.in_(keys)
                    )
                )
                return {m: t.timestamp() for m, t in rows}

        wait(lambda keys=keys: len(stored(keys)) == len(keys), 300, "every swept signal stored")
        at = stored()
        lat = [at[m] - sent[m] for m in keys]
        points.append(
            {
                "fraction": frac,
                "offered_per_s": rate,
                "achieved_per_s": len(keys) / (max(at.values()) - min(sent.values())),
                "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99),
            }
        )
    return points


def plot_sweep(points: list[dict[str, float]], floor: dict[str, float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = [p["achieved_per_s"] for p in points]
    ax.plot(x, [p["p50_ms"] for p in points], "o-", label="p50")
    ax.plot(x, [p["p99_ms"] for p in points], "s-", label="p99")
    for p in points:
        ax.annotate(
            f"{p['offered_per_s']:.0f}/s offered",
            (p["achieved_per_s"], p["p99_ms"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.axhline(500, color="grey", ls=":", lw=1, label="target p99 500 ms")
    ax.set_xlabel("ready signals stored per second (one orchestrator)")
    ax.set_ylabel("signal → database latency (ms)")
    ax.set_yscale("log")
    title = "fedmq orchestrator: throughput vs latency"
    if floor:
        title += f"\n(db single-commit floor {floor['db_single_commit_per_s']:.0f}/s)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=120)
    plt.close(fig)


def wait(predicate: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def warm_up(bus: Bus, run_id: str, timeout: float = 120.0) -> None:
    """One registration answered before the clock starts: the orchestrator has booted
    (imports, migrations, consumers, its lease on the run) and the phases measure it
    working, not starting. The extra client never signals ready, so it is never selected."""
    key = "loadwarmup"
    queue = topology.declare_device(bus, key)
    msg = Register(
        run_id=run_id, display_name="warm-up", reply_key=key, reply_pub=sealing.new_keypair()[1]
    )
    bus.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(key), msg.to_json())
    d = bus.get(queue, timeout=timeout)
    if d is None:
        raise TimeoutError("the orchestrator did not answer a registration")
    d.ack()


# One Celery worker serving aggregation and evaluation, quietly.
WORKER = (
    *("-m", "celery", "-A", "workers.app", "worker", "-Q", "aggregate,evaluate"),
    *("--concurrency", "1", "--pool", "solo", "--loglevel", "WARNING"),
    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
)


def spawn(
    procs: list[subprocess.Popen[bytes]], env: dict[str, str], *args: str, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """``python *args`` in its own session (so that its whole group can be killed), added
    to ``procs``."""
    p = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(p)
    return p


def cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def tree_cpu_s(pid: int) -> float:
    """``cpu_s`` of a process and its live children (an orchestrator's ingest processes)."""
    total = cpu_s(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += cpu_s(child)
    return total


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) * 1000  # ms


def run(
    n: int,
    *,
    big: bool = False,
    tree: Path = ROOT,
    with_sweep: bool = True,
    ingest_processes: int = 0,
) -> dict[str, Any]:
    """One scenario; ``tree``: the source tree the orchestrator runs from (an older commit's
    checkout measures the old code in the same run); ``ingest_processes``: the
    orchestrator's child processes that store updates (its CPU figures include theirs)."""
    with LoadAverage() as load:
        out = _run(n, big, tree, with_sweep, ingest_processes)
    return {**out, **load.summary(), "ingest_processes": ingest_processes}


def _run(
    n: int, big: bool, tree: Path, with_sweep: bool, ingest_processes: int = 0
) -> dict[str, Any]:
    scratch = make_scratch("fedmq_load")
    vhost, amqp, db_url = scratch.vhost, scratch.amqp_url, scratch.db_url
    procs: list[subprocess.Popen[bytes]] = []
    engine = None
    bus: Bus | None = None
    try:
        env = {
            **os.environ,
            "FEDMQ_BROKER_URL": amqp,
            "FEDMQ_DATABASE_URL": db_url,
            "FEDMQ_OPERATOR_TOKEN": TOKEN,
        }
        env.pop("FEDMQ_RESULT_BACKEND", None)
        if tree == ROOT:
            migrations.upgrade(db_url)
        else:  # the old code's schema, made by its own migrations
            subprocess.run(
                [sys.executable, "-m", "fedmq.cli", "db", "upgrade"],
                cwd=tree,
                env=env,
                capture_output=True,
                check=True,
            )

        def start(*args: str, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
            return spawn(procs, env, *args, cwd=cwd)

        start(*WORKER)
        extra = ("--ingest-processes", str(ingest_processes)) if ingest_processes else ()
        orch = start("-m", "fedmq.cli", "orchestrator", "--no-upgrade", *extra, cwd=tree)
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        bus = connect(amqp)
        topology.declare(bus)
        base = model(big)
        policy = RoundPolicy(
            min_clients=n, quorum_fraction=1.0, deadline_s=900, heartbeat_timeout_s=3600
        )
        if tree == ROOT:
            with session_scope(sessions) as s:
                run_id = create_run(s, "load", encode(base, Encoding.FP32), policy=policy)
        else:
            # The old code makes its own run: this code's snapshot may carry fields (policy
            # options, client records) the old one cannot read. (The harness's own reads
            # select only columns both schemas have.)
            run_id = _old_run(tree, env, encode(base, Encoding.FP32), policy)
        replies = topology.declare_device(bus, REPLY_KEY)
        warm_up(bus, run_id)

        def count(stmt: Any) -> int:
            with session_scope(sessions) as s:
                return int(s.scalar(stmt) or 0)

        # 1. Registration: n Register messages, n Registered answers on one queue (read by
        # a consumer: one basic.get per answer would be the generator's own limit).
        # One key pair for the whole generated fleet: its answers share one queue anyway.
        private, public = sealing.new_keypair()
        regs = [
            Register(run_id=run_id, display_name=f"d{i}", reply_key=REPLY_KEY, reply_pub=public)
            for i in range(n)
        ]
        key = topology.signal_routing_key(REPLY_KEY)
        tokens: dict[str, str] = {}
        all_in = threading.Event()

        def on_replies(ds: list[Delivery]) -> None:
            for d in ds:
                msg = parse_as(d.body, Registered)
                context = registered_context(run_id, REPLY_KEY, msg.client_id)
                tokens[msg.client_id] = sealing.unseal(msg.sealed_token, private, context)
                d.ack()
            if len(tokens) >= n:
                all_in.set()

        reader = bus.consume_batches(
            replies, on_replies, batching=Batching(max_messages=256, linger_s=0), prefetch=256
        )
        t0 = time.time()
        cpu_at_reg = tree_cpu_s(orch.pid)
        publish_all(
            bus,
            lambda i: Outgoing(topology.SIGNALS_EXCHANGE, key, regs[i].to_json()),
            list(range(n)),
        )
        all_in.wait(300)
        t_registered = time.time()
        cpu_reg = tree_cpu_s(orch.pid) - cpu_at_reg
        reader.stop()
        assert len(tokens) == n, f"{len(tokens)} of {n} registered"

        # 2. Ready signals: publish time per client vs the last_seen the orchestrator wrote.
        def ready(cid: str) -> Outgoing:
            sig = auth.sign(
                Signal(run_id=run_id, client_id=cid, state=ClientState.READY), tokens[cid]
            )
            return Outgoing(
                topology.SIGNALS_EXCHANGE, topology.signal_routing_key(cid), sig.to_json()
            )

        ids = sorted(tokens)
        t1 = time.time()
        cpu_at_ready = tree_cpu_s(orch.pid)
        sent_at = publish_all(bus, ready, ids)
        ready_count = (
            select(func.count())
            .select_from(Client)
            .where(Client.run_id == run_id, Client.state == "ready")
        )
        t_ready = wait(lambda: count(ready_count) == n, 300, "every device ready")
        with session_scope(sessions) as s:
            seen = {c.id: c.last_seen.timestamp() for c in q.list_clients(s, run_id)}
        signal_lat = [seen[c] - sent_at[c] for c in ids]
        # The phase ends when the orchestrator wrote the last one (its own timestamp, same
        # host clock), not when the 0.2 s poll above noticed: a 1 s phase would be off 20 %.
        t_ready = min(t_ready, max(seen.values()))
        cpu_ready = tree_cpu_s(orch.pid) - cpu_at_ready

        # 2b. One heartbeat per device, measured until the signals queue is drained. A
        # heartbeat within a quarter of the timeout of the last refresh writes nothing (the
        # machine's refresh throttle), so this is the common, cheap path.
        def queued() -> int:
            out = subprocess.run(
                ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for line in out.splitlines():
                name, _, depth = line.partition("\t")
                if name == topology.SIGNALS_QUEUE:
                    return int(depth)
            return 0

        def beat(cid: str) -> Outgoing:
            hb = auth.sign(Heartbeat(run_id=run_id, client_id=cid), tokens[cid])
            return Outgoing(
                topology.SIGNALS_EXCHANGE, topology.signal_routing_key(cid), hb.to_json()
            )

        t_hb = time.time()
        publish_all(bus, beat, ids)
        t_beats = wait(lambda: queued() == 0, 300, "every heartbeat consumed")

        # 2c. Ready signals again (each refreshes last_seen: a write), offered at steady
        # rates around the burst's, for latency under load rather than behind a burst.
        def alive(cid: str) -> tuple[str, Outgoing]:
            sig = auth.sign(
                Signal(run_id=run_id, client_id=cid, state=ClientState.READY), tokens[cid]
            )
            route = topology.signal_routing_key(cid)
            return sig.message_id, Outgoing(topology.SIGNALS_EXCHANGE, route, sig.to_json())

        swept = (
            [] if big or not with_sweep else sweep(bus, sessions, alive, ids, n / (t_ready - t1))
        )

        # 3. One round, everyone selected; one small update each.
        cmd = auth.sign(Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=1), TOKEN)
        bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())

        def round_open() -> bool:
            with session_scope(sessions) as s:
                r = q.get_round(s, run_id, 1)
                return r is not None and len(q.list_participations(s, r.id)) == n

        wait(round_open, 300, "round 1 open with every device")
        message_ids: dict[str, str] = {}
        # Updates are encoded before the clock starts: the devices' work, not the platform's
        # (inside it, the generator's own encoding on these 2 cores was the limit).
        blobs = {cid: trained(base, cid) for cid in ids}

        def update(cid: str) -> Outgoing:
            blob = blobs[cid]
            meta = auth.sign(
                UpdateMeta(
                    run_id=run_id,
                    client_id=cid,
                    round=1,
                    base_model_version=0,
                    num_samples=10,
                    encoding="fp32",
                    blob_sha256=hashlib.sha256(blob).hexdigest(),
                    blob_bytes=len(blob),
                ),
                tokens[cid],
            )
            message_ids[cid] = meta.message_id
            (chunk,) = chunking.iter_chunks(blob)  # one chunk: the default chunk size is 4 MiB
            headers = enveloped.headers(chunk, meta)
            route = topology.update_routing_key(run_id, 1, cid)
            return Outgoing(topology.UPDATES_EXCHANGE, route, chunk.data, headers)

        t2 = time.time()
        cpu_at_updates = tree_cpu_s(orch.pid)
        update_sent = publish_all(bus, update, ids)
        counted = (
            select(func.count())
            .select_from(Participation)
            .where(Participation.state == ParticipationState.UPDATE)
        )
        t_updates = wait(lambda: count(counted) == n, 600, "every update counted")
        cpu_updates = tree_cpu_s(orch.pid) - cpu_at_updates

        def round_done() -> bool:
            with session_scope(sessions) as s:
                r = q.get_round(s, run_id, 1)
                return r is not None and str(r.state) == "done"

        t_done = wait(round_done, 600, "round 1 done")
        with session_scope(sessions) as s:
            r = q.get_round(s, run_id, 1)
            assert r is not None
            parts = q.list_participations(s, r.id)
            per_message = Counter(p.message_id for p in parts if p.state == "update")
            received = {p.client_id: p.received_at.timestamp() for p in parts if p.received_at}
            mv = q.get_model_version_by_id(s, r.model_version_id) if r.model_version_id else None
            aggregated = int(mv.metrics.get("num_updates", 0)) if mv else 0
        lost = [c for c in ids if per_message[message_ids[c]] != 1]
        update_lat = [received[c] - update_sent[c] for c in ids if c in received]
        if received:  # as for signals: the orchestrator's time of the last one counted
            t_updates = min(t_updates, max(received.values()))
        peak = peak_rss_mb(orch.pid)
        sizes = [len(b) for b in blobs.values()] or [len(trained(base, ids[0]))]
        update_bytes = float(np.mean(sizes))
        return {
            "devices": n,
            "big": big,
            "update_bytes": update_bytes,
            "chunks_per_update": -(-int(max(sizes)) // chunking.DEFAULT_CHUNK_SIZE),
            "mb_per_s": n * update_bytes / 1e6 / (t_updates - t2),
            "register_s": t_registered - t0,
            "register_per_s": n / (t_registered - t0),
            "signals_s": t_ready - t1,
            "signals_per_s": n / (t_ready - t1),
            "signal_to_db_p50_ms": pct(signal_lat, 50),
            "signal_to_db_p99_ms": pct(signal_lat, 99),
            "heartbeats_s": t_beats - t_hb,
            "heartbeats_per_s": n / (t_beats - t_hb),
            "updates_s": t_updates - t2,
            "updates_per_s": n / (t_updates - t2),
            "update_to_db_p50_ms": pct(update_lat, 50),
            "update_to_db_p99_ms": pct(update_lat, 99),
            "messages_per_s": 3 * n / ((t_registered - t0) + (t_ready - t1) + (t_updates - t2)),
            # Orchestrator CPU (user + system) per message of each phase: steadier than rates
            # on a shared machine, and what a second process would have to share.
            "register_cpu_ms": cpu_reg / n * 1000,
            "signals_cpu_ms": cpu_ready / n * 1000,
            "updates_cpu_ms": cpu_updates / n * 1000,
            "last_update_to_round_done_s": t_done - t_updates,
            "aggregated": aggregated,
            "orchestrator_peak_rss_mb": peak,
            "lost": len(lost),
            "sweep": swept,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if bus is not None:
            bus.close()
        if engine is not None:
            engine.dispose()
        drop_scratch(scratch)


def _old_run(tree: Path, env: dict[str, str], model_blob: bytes, policy: RoundPolicy) -> str:
    """A run made by the old code's own ``fedmq run create``; its id."""
    fields = ("min_clients", "quorum_fraction", "deadline_s", "heartbeat_timeout_s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.fmqt"
        path.write_bytes(model_blob)
        out = subprocess.run(
            [
                *(sys.executable, "-m", "fedmq.cli", "run", "create", "--name", "load"),
                *("--model", str(path)),
                *("--policy", json.dumps({f: getattr(policy, f) for f in fields})),
            ],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    parser.add_argument(
        "--old-tree", type=Path, default=None, help="a checkout of the old code, run too"
    )
    parser.add_argument(
        "--big", type=int, default=100, help="devices sending ~1 MB updates (0: no)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the latency sweep")
    parser.add_argument(
        "--ingest-processes",
        type=int,
        default=0,
        help="also run both scenarios with an orchestrator of this many ingest processes",
    )
    parser.add_argument(
        "--name",
        default="load",
        help="the docs section and JSON file it writes (e.g. load-10k for a second fleet size)",
    )
    args = parser.parse_args()
    scratch = make_scratch("fedmq_floor")
    try:
        floor = measure_floor(scratch.amqp_url, scratch.db_url)
    finally:
        drop_scratch(scratch)
    r = run(args.devices, with_sweep=not args.no_sweep)
    r["floor"] = floor
    if args.old_tree is not None:
        r["old"] = run(args.devices, tree=args.old_tree.resolve(), with_sweep=False)
        r["old"]["commit"] = subprocess.run(
            ["git", "-C", str(args.old_tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    big = run(args.big, big=True) if args.big else None
    if big is not None:
        r["big_updates"] = big
    extra: list[dict[str, Any]] = []
    if args.ingest_processes:
        k = args.ingest_processes
        r["with_ingest_processes"] = run(args.devices, with_sweep=False, ingest_processes=k)
        extra.append(r["with_ingest_processes"])
        if args.big:
            r["big_with_ingest_processes"] = run(args.big, big=True, ingest_processes=k)
            extra.append(r["big_with_ingest_processes"])
    r["previous"] = PREVIOUS
    if r["sweep"]:
        plot_sweep(r["sweep"], floor)
    table = markdown(r)
    print(table)
    print(machine_line(machine()))
    if not args.quick:
        publish(args.name, table, r)
    ok = [x for x in (r, r.get("old"), big, *extra) if x is not None]
    return 0 if all(x["lost"] == 0 and x["aggregated"] == x["devices"] for x in ok) else 1


def _ms(r: dict[str, Any], key: str) -> str:
    return f"{r[f'{key}_p50_ms']:,.0f} / {r[f'{key}_p99_ms']:,.0f} ms"


def _load(r: dict[str, Any]) -> str:
    return (
        f"{r['load_avg_1m_mean']:.1f} mean, {r['load_avg_1m_max']:.1f} max "
        f"({r['load_avg_1m_start']:.1f} at the start)"
    )


def markdown(r: dict[str, Any]) -> str:
    f, old = r["floor"], r.get("old")

    def rate(x: dict[str, Any], key: str, seconds: str) -> str:
        return f"{x[key]:,.0f} /s ({x[seconds]:.1f} s)"

    def row(
        label: str, key: str, seconds: str | None, floor: str | None = None, fmt: str = ",.0f"
    ) -> str:
        now = rate(r, key, seconds) if seconds else format(r[key], fmt)
        cells = [label]
        if old:
            was = rate(old, key, seconds) if seconds else format(old[key], fmt)
            cells += [was, now, f"{r[key] / old[key]:.1f}x" if old[key] else ""]
        else:
            cells.append(now)
        cells.append(f"{r[key] / f[floor]:.2f}" if floor else "")
        return "| " + " | ".join(cells) + " |"

    head = ["measure"] + (
        [f"old code ({old['commit']}), same run", "now", "now / old"] if old else ["now"]
    )
    lines = [
        f"## Load: {r['devices']:,} light devices in one round (RabbitMQ + Postgres)",
        "",
        f"{r['devices']:,} simulated devices speak the wire protocol from {THREADS} publisher "
        f"threads (AMQP transactions of {PER_TX} messages, so that the generator outruns the "
        "orchestrator): register (one reply queue), signal ready, heartbeat, then each sends "
        f"one {r['update_bytes']:.0f} B update (fp32 delta, one chunk) in one round that selects "
        "all of them; one `fedmq orchestrator` process (two ingest consumers, group commit: up "
        "to 64 signals or 32 updates a transaction) and one Celery worker. Phase rates run from "
        "the first publish to the last message in the database (registrations: to the last "
        "`Registered` reply received).",
        "",
        "**The floor**, measured first in the same run on the same servers "
        "(`benchmarks/floor.py`): RabbitMQ consume + ack of 200-byte persistent messages "
        f"**{f['broker_consume_ack_per_s']:,.0f} /s**; PostgreSQL single-row upsert, one commit "
        f"each, **{f['db_single_commit_per_s']:,.0f} /s**; the same upserts 100 to a commit "
        f"**{f['db_batched_rows_per_s']:,.0f} rows/s**; 1 MiB rows one commit each "
        f"**{f['db_large_write_mb_per_s']:,.1f} MB/s**. The last column is fedmq's rate over "
        "the database's one-commit-each rate (for update MB/s: over its large-write rate).",
        "",
        "| " + " | ".join([*head, "now / db single-commit floor"]) + " |",
        "|---|" + "---:|" * len(head),
        row(
            "registrations (Register → Registered received)",
            "register_per_s",
            "register_s",
            "db_single_commit_per_s",
        ),
        row(
            "ready signals (publish → all `ready` in the database)",
            "signals_per_s",
            "signals_s",
            "db_single_commit_per_s",
        ),
        row(
            "heartbeats (publish → queue drained; refresh-throttled, no write)",
            "heartbeats_per_s",
            "heartbeats_s",
            "db_single_commit_per_s",
        ),
        row(
            "updates (publish → all counted)",
            "updates_per_s",
            "updates_s",
            "db_single_commit_per_s",
        ),
        row(
            "**messages per second sustained** (register, ready, update)",
            "messages_per_s",
            None,
            "db_single_commit_per_s",
        ),
        row(
            "orchestrator CPU per registration (ms; lower is better)",
            "register_cpu_ms",
            None,
            fmt=".2f",
        ),
        row("orchestrator CPU per ready signal (ms)", "signals_cpu_ms", None, fmt=".2f"),
        row("orchestrator CPU per update (ms)", "updates_cpu_ms", None, fmt=".2f"),
        row("orchestrator peak memory (VmHWM, MB)", "orchestrator_peak_rss_mb", None),
        row("updates lost (not in exactly one participation row)", "lost", None),
        "",
        f"Burst latencies (every device publishes at once, so they are mostly queueing): signal "
        f"→ database p50 / p99 {_ms(r, 'signal_to_db')}, update → database "
        f"{_ms(r, 'update_to_db')}"
        + (f" (old code: {_ms(old, 'signal_to_db')} and {_ms(old, 'update_to_db')})" if old else "")
        + f". Last update counted → round done (aggregate {r['aggregated']} updates, "
        f"evaluate): {r['last_update_to_round_done_s']:.1f} s.",
        "",
        f"Load average (1 min) on the 2-core machine during the run: {_load(r)}.",
    ]
    sweep_points = r.get("sweep") or []
    if sweep_points:
        lines += [
            "",
            "### Latency under a steady offered load",
            "",
            "Ready signals from the ready fleet (each refreshes `last_seen`: a write), offered at "
            "steady rates (ticks of 20 ms, 5 s each) as fractions of the burst's rate; a "
            "signal is stored once its message id is in `processed_messages`, written in the "
            "transaction that applied it.",
            "",
            "| offered | stored | p50 | p99 |",
            "|---:|---:|---:|---:|",
            *[
                f"| {p['offered_per_s']:,.0f} /s ({p['fraction']:.0%}) | "
                f"{p['achieved_per_s']:,.0f} /s | {p['p50_ms']:,.0f} ms | {p['p99_ms']:,.0f} ms |"
                for p in sweep_points
            ],
            "",
            "![throughput vs latency](img/load_latency.png)",
        ]
    big = r.get("big_updates")
    if big:
        lines += ["", *markdown_big(big, f)]
    lines += markdown_ingest(r)
    return "\n".join(lines)


def markdown_ingest(r: dict[str, Any]) -> list[str]:
    """The scenarios run again with ingest processes (``--ingest-processes``)."""
    light, big = r.get("with_ingest_processes"), r.get("big_with_ingest_processes")
    if not light:
        return []
    k = light["ingest_processes"]
    lines = [
        "",
        f"### With {k} ingest process{'es' if k != 1 else ''}",
        "",
        f"The same scenarios with `fedmq orchestrator --ingest-processes {k}`: "
        + (f"{k} child processes store" if k != 1 else "a child process stores")
        + " the updates and the parent signals, counts and sends "
        f"({k + 1} processes; CPU figures are all of them together).",
        "",
        "| measure | one process | with ingest processes |",
        "|---|---:|---:|",
        f"| updates (publish → all counted) | {r['updates_per_s']:,.0f} /s | "
        f"{light['updates_per_s']:,.0f} /s |",
        f"| orchestrator CPU per update (ms) | {r['updates_cpu_ms']:.2f} | "
        f"{light['updates_cpu_ms']:.2f} |",
        f"| ready signals | {r['signals_per_s']:,.0f} /s | {light['signals_per_s']:,.0f} /s |",
        f"| updates lost | {r['lost']} | {light['lost']} |",
    ]
    one_big = r.get("big_updates")
    if big and one_big:
        lines += [
            f"| 1 MB updates | {one_big['mb_per_s']:.1f} MB/s | {big['mb_per_s']:.1f} MB/s |",
            f"| 1 MB updates lost | {one_big['lost']} | {big['lost']} |",
        ]
    lines += ["", f"Load average (1 min) during these scenarios: {_load(light)}."]
    return lines


def markdown_big(r: dict[str, Any], floor: dict[str, float]) -> list[str]:
    chunks = r["chunks_per_update"]
    return [
        f"### {r['devices']} devices sending {r['update_bytes'] / 1e6:.1f} MB updates",
        "",
        f"A second scenario with its own orchestrator, worker, vhost and database: "
        f"{r['devices']} devices register and signal ready the same way, then each sends one "
        f"{r['update_bytes'] / 1e6:.2f} MB update (fp32 delta of noise on a 512x640 tensor, "
        f"incompressible; {chunks} chunk{'s' if chunks != 1 else ''} each at the default "
        f"{chunking.DEFAULT_CHUNK_SIZE >> 20} MiB chunk size), encoded before the clock "
        "starts, from 4 publisher threads into one round that selects all of them.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| updates (publish → all counted) | {r['updates_per_s']:.1f} /s "
        f"({r['updates_s']:.1f} s) |",
        f"| update throughput | {r['mb_per_s']:.1f} MB/s "
        f"({r['mb_per_s'] / floor['db_large_write_mb_per_s']:.0%} of the database's "
        f"{floor['db_large_write_mb_per_s']:.1f} MB/s of 1 MiB rows, one commit each) |",
        f"| update → database latency p50 / p99 | {_ms(r, 'update_to_db')} |",
        f"| orchestrator CPU per update (ms) | {r['updates_cpu_ms']:.1f} |",
        f"| last update counted → round done (aggregate {r['aggregated']} updates, evaluate) | "
        f"{r['last_update_to_round_done_s']:.1f} s |",
        f"| orchestrator peak memory (VmHWM) | {r['orchestrator_peak_rss_mb']:.0f} MB |",
        f"| updates lost (not in exactly one participation row) | **{r['lost']}** |",
        "",
        f"Load average (1 min) during this scenario: {_load(r)}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
