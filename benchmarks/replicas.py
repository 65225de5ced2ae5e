"""Replicas: throughput of 1, 2 and 3 ``fedmq orchestrator`` processes on one RabbitMQ and
one Postgres, sharing several runs (issue 16, item 4).

Each scenario has its own vhost, database, Celery worker and N orchestrator replicas
(``fedmq orchestrator --replica-id rK``). ``--runs`` runs are made (default 4) and the
benchmark waits until the replicas have spread their leases (between floor and ceil of runs /
replicas each). Then, as in ``benchmarks/load.py`` but over every run at once: ``--devices``
light devices per run (default 250) register (one reply queue), signal ready, and, once
autorun opened round 1 of every run with all of its devices, each sends one ~1.1 KB update
(fp32 delta, one chunk), from 4 publisher threads in AMQP transactions of 50.

Measured per phase: messages per second (first publish -> last one in the database) and for
the whole (register + ready + update messages over the three phases' time); what each
replica did (messages it consumed from each queue, updates it counted, runs it held) and its
snapshot-cache hits and misses, which it writes into its ``replicas`` row with every lease
renewal; how many ``Registered`` replies and ``fedmq.events`` messages arrived per one
decided (the outbox is drained by every replica: more than 1.00 is duplicates); the load
average; loss (each update in exactly one participation row, every round aggregated).

    .venv/bin/python benchmarks/replicas.py                 # 1, 2, 3 replicas; docs + JSON
    .venv/bin/python benchmarks/replicas.py --replicas 1,2 --devices 50 --quick   # prints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _report import RESULTS, machine, machine_line, publish, write_section
from _scratch import drop_scratch, make_scratch
from floor import measure as measure_floor
from load import (
    PER_TX,
    THREADS,
    WORKER,
    LoadAverage,
    cpu_s,
    model,
    pct,
    peak_rss_mb,
    publish_all,
    spawn,
    trained,
    wait,
)
from sqlalchemy import func, select

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Client, OutboxItem, Participation, ParticipationState, Replica, Round
from db.queries import leases as lq
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import auth, chunking, enveloped, sealing, topology
from protocol.bus import Batching, Bus, Delivery, Outgoing, connect
from protocol.codec import Encoding, encode
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Register,
    Registered,
    Signal,
    UpdateMeta,
    parse_as,
    registered_context,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "replicas-operator-token-0123456789"
REPLY_KEY = "replicasreplies"
EVENTS_PROBE = "bench.events"


def queue_depth(vhost: str, queue: str) -> int:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        name, _, depth = line.partition("\t")
        if name == queue:
            return int(depth)
    return 0


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, over all cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def run(replicas: int, runs: int, devices: int) -> dict[str, Any]:
    with LoadAverage() as load:
        out = _run(replicas, runs, devices)
    return {**out, **load.summary()}


def _run(replicas: int, n_runs: int, per_run: int) -> dict[str, Any]:
    scratch = make_scratch("fedmq_replicas")
    vhost, amqp, db_url = scratch.vhost, scratch.amqp_url, scratch.db_url
    procs: list[subprocess.Popen[bytes]] = []
    engine = None
    bus: Bus | None = None
    n = n_runs * per_run
    try:
        migrations.upgrade(db_url)
        env = {
            **os.environ,
            "FEDMQ_BROKER_URL": amqp,
            "FEDMQ_DATABASE_URL": db_url,
            "FEDMQ_OPERATOR_TOKEN": TOKEN,
        }
        env.pop("FEDMQ_RESULT_BACKEND", None)

        def start(*args: str) -> subprocess.Popen[bytes]:
            return spawn(procs, env, *args)

        start(*WORKER)
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        bus = connect(amqp)
        topology.declare(bus)
        # Every event the outbox publishes lands here too (not consumed: counted at the end).
        probe = topology.Queue(EVENTS_PROBE, durable=False, dead_letter_exchange=None)
        bus.declare(
            topology.Topology(
                queues=(probe,),
                bindings=(topology.Binding(topology.EVENTS_EXCHANGE, EVENTS_PROBE, ""),),
            )
        )
        base = model()
        policy = RoundPolicy(
            min_clients=per_run, quorum_fraction=1.0, deadline_s=900, heartbeat_timeout_s=3600
        )
        with session_scope(sessions) as s:
            run_ids = [
                create_run(s, f"replicas-{k}", encode(base, Encoding.FP32), policy=policy)
                for k in range(n_runs)
            ]
        orchs = [
            start("-m", "fedmq.cli", "orchestrator", "--replica-id", f"r{i}")
            for i in range(replicas)
        ]

        def held() -> dict[str, str]:
            with session_scope(sessions) as s:
                return lq.lease_holders(s)

        lo, hi = n_runs // replicas, -(-n_runs // replicas)

        def spread() -> bool:
            h = held()
            counts = Counter(h.values())
            return (
                set(h) == set(run_ids)
                and len(counts) == min(replicas, n_runs)
                and all(lo <= c <= hi for c in counts.values())
            )

        wait(spread, 60, "the leases spread over the replicas")
        leases_at_start = dict(Counter(held().values()))

        def count(stmt: Any) -> int:
            with session_scope(sessions) as s:
                return int(s.scalar(stmt) or 0)

        # 1. Registration over every run: one reply queue, read by a consumer.
        # One key pair for the whole generated fleet: its answers share one queue anyway.
        private, public = sealing.new_keypair()
        regs = [
            Register(
                run_id=run_ids[i % n_runs],
                display_name=f"d{i}",
                reply_key=REPLY_KEY,
                reply_pub=public,
            )
            for i in range(n)
        ]
        replies = topology.declare_device(bus, REPLY_KEY)
        key = topology.signal_routing_key(REPLY_KEY)
        tokens: dict[str, tuple[str, str]] = {}  # client -> (run, token)
        replies_seen = 0
        all_in = threading.Event()

        def on_replies(ds: list[Delivery]) -> None:
            nonlocal replies_seen
            for d in ds:
                msg = parse_as(d.body, Registered)
                context = registered_context(msg.run_id, REPLY_KEY, msg.client_id)
                token = sealing.unseal(msg.sealed_token, private, context)
                tokens[msg.client_id] = (msg.run_id, token)
                replies_seen += 1
                d.ack()
            if len(tokens) >= n:
                all_in.set()

        reader = bus.consume_batches(
            replies, on_replies, batching=Batching(max_messages=256, linger_s=0), prefetch=256
        )
        cpu0 = sum(cpu_s(p.pid) for p in orchs)
        busy0, total0 = machine_cpu_s()
        me0 = time.process_time()
        t0 = time.time()
        publish_all(
            bus,
            lambda i: Outgoing(topology.SIGNALS_EXCHANGE, key, regs[i].to_json()),
            list(range(n)),
        )
        all_in.wait(600)
        t_registered = time.time()
        assert len(tokens) == n, f"{len(tokens)} of {n} registered"
        time.sleep(1.0)  # late duplicates of the replies, if any
        reader.stop()

        # 2. Ready signals.
        def ready(cid: str) -> Outgoing:
            run_id, token = tokens[cid]
            sig = auth.sign(Signal(run_id=run_id, client_id=cid, state=ClientState.READY), token)
            return Outgoing(
                topology.SIGNALS_EXCHANGE, topology.signal_routing_key(cid), sig.to_json()
            )

        ids = sorted(tokens)
        t1 = time.time()
        sent_at = publish_all(bus, ready, ids)
        ready_count = select(func.count()).select_from(Client).where(Client.state == "ready")
        t_ready = wait(lambda: count(ready_count) == n, 600, "every device ready")
        with session_scope(sessions) as s:
            seen = {
                c.id: c.last_seen.timestamp()
                for run_id in run_ids
                for c in q.list_clients(s, run_id)
            }
        signal_lat = [seen[c] - sent_at[c] for c in ids]

        # 3. Round 1 of every run, everyone selected; one small update each.
        for run_id in run_ids:
            cmd = auth.sign(Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=1), TOKEN)
            bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())
        selected = (
            select(func.count())
            .select_from(Participation)
            .join(Round, Round.id == Participation.round_id)
            .where(Round.number == 1)
        )
        wait(lambda: count(selected) == n, 600, "round 1 open with every device, every run")
        blobs = {cid: trained(base, cid) for cid in ids}
        message_ids: dict[str, str] = {}

        def update(cid: str) -> Outgoing:
            run_id, token = tokens[cid]
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
            meta = auth.sign(meta, token)
            message_ids[cid] = meta.message_id
            (chunk,) = chunking.iter_chunks(blob)
            headers = enveloped.headers(chunk, meta)
            route = topology.update_routing_key(run_id, 1, cid)
            return Outgoing(topology.UPDATES_EXCHANGE, route, chunk.data, headers)

        counted = (
            select(func.count())
            .select_from(Participation)
            .where(Participation.state == ParticipationState.UPDATE)
        )
        t2 = time.time()
        update_sent = publish_all(bus, update, ids)
        t_updates = wait(lambda: count(counted) == n, 600, "every update counted")
        orch_cpu = sum(cpu_s(p.pid) for p in orchs) - cpu0
        busy1, total1 = machine_cpu_s()
        generator_cpu = time.process_time() - me0

        done = (
            select(func.count()).select_from(Round).where(Round.number == 1, Round.state == "done")
        )
        t_done = wait(lambda: count(done) == n_runs, 600, "round 1 of every run done")
        time.sleep(2.5)  # a lease renewal or two: the replicas' rows carry their final figures
        with session_scope(sessions) as s:
            parts = list(
                s.scalars(
                    select(Participation)
                    .join(Round, Round.id == Participation.round_id)
                    .where(Round.number == 1)
                )
            )
            per_message = Counter(p.message_id for p in parts if p.state == "update")
            received = {p.client_id: p.received_at.timestamp() for p in parts if p.received_at}
            aggregated = 0
            for run_id in run_ids:
                r = q.get_round(s, run_id, 1)
                assert r is not None and r.model_version_id is not None
                mv = q.get_model_version_by_id(s, r.model_version_id)
                aggregated += int(mv.metrics.get("num_updates", 0)) if mv else 0
            rows = list(s.scalars(select(Replica).order_by(Replica.id)))
            per_replica = [
                {"id": rep.id, **rep.info, "peak_rss_mb": peak_rss_mb(orchs[i].pid)}
                for i, rep in enumerate(rows)
            ]
            events_decided = int(
                s.scalar(
                    select(func.count()).select_from(OutboxItem).where(OutboxItem.kind == "event")
                )
                or 0
            )
        lost = [c for c in ids if per_message[message_ids[c]] != 1]
        update_lat = [received[c] - update_sent[c] for c in ids if c in received]
        events_seen = queue_depth(vhost, EVENTS_PROBE)
        hits = sum(int(r.get("cache_hits", 0)) for r in per_replica)
        misses = sum(int(r.get("cache_misses", 0)) for r in per_replica)
        window = (t_registered - t0) + (t_ready - t1) + (t_updates - t2)
        cores = len(os.sched_getaffinity(0))
        return {
            "replicas": replicas,
            "runs": n_runs,
            "devices_per_run": per_run,
            "devices": n,
            "leases_at_start": leases_at_start,
            "register_s": t_registered - t0,
            "register_per_s": n / (t_registered - t0),
            "signals_s": t_ready - t1,
            "signals_per_s": n / (t_ready - t1),
            "signal_to_db_p50_ms": pct(signal_lat, 50),
            "signal_to_db_p99_ms": pct(signal_lat, 99),
            "updates_s": t_updates - t2,
            "updates_per_s": n / (t_updates - t2),
            "update_to_db_p50_ms": pct(update_lat, 50),
            "update_to_db_p99_ms": pct(update_lat, 99),
            "messages_per_s": 3 * n / window,
            # CPU over registration -> last update counted (gaps between phases included):
            # the orchestrators' own, this generator's, and the machine's, which is shared.
            "orchestrators_cpu_ms_per_message": 1000 * orch_cpu / (3 * n),
            "generator_cpu_ms_per_message": 1000 * generator_cpu / (3 * n),
            "machine_busy_cpu_ms_per_message": 1000 * (busy1 - busy0) / (3 * n),
            "machine_busy_fraction": (busy1 - busy0) / (total1 - total0),
            "orchestrators_cores_used": orch_cpu / (t_updates - t0),
            "cores": cores,
            "last_update_to_rounds_done_s": t_done - t_updates,
            "aggregated": aggregated,
            "lost": len(lost),
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
            "replies_per_registration": replies_seen / n,
            "events_per_decided": events_seen / events_decided if events_decided else 0.0,
            "per_replica": per_replica,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, comma-separated")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--devices", type=int, default=250, help="devices per run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure the replica counts this many times"
    )
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the docs section from the saved JSON"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "replicas.json").read_text())
        write_section(
            "replicas", f"{markdown(saved['results'])}\n\n{machine_line(saved['machine'])}\n"
        )
        return 0
    counts = [int(x) for x in args.replicas.split(",")]
    scratch = make_scratch("fedmq_floor")
    try:
        floor = measure_floor(scratch.amqp_url, scratch.db_url)
    finally:
        drop_scratch(scratch)
    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for k in counts:
            r = run(k, args.runs, args.devices)
            r["pass"] = rep + 1
            results.append(r)
            print(
                f"replicas={k} pass={rep + 1}: {r['messages_per_s']:.0f} msg/s, "
                f"register {r['register_per_s']:.0f}/s, ready {r['signals_per_s']:.0f}/s, "
                f"updates {r['updates_per_s']:.0f}/s, cache hit {r['cache_hit_rate']:.1%}, "
                f"lost {r['lost']}, load {r['load_avg_1m_mean']:.1f}",
                flush=True,
            )
    out = {"floor": floor, "scenarios": results}
    table = markdown(out)
    print(table)
    print(machine_line(machine()))
    if not args.quick:
        publish("replicas", table, out)
    ok = all(r["lost"] == 0 and r["aggregated"] == r["devices"] for r in results)
    return 0 if ok else 1


def _median(rs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in rs]))


def reading(by: dict[int, list[dict[str, Any]]], floor: dict[str, float]) -> list[str]:
    """What the figures say about scaling on the machine they were measured on."""
    one = by.get(1)
    if not one or len(by) < 2:
        return []
    more = [k for k in sorted(by) if k > 1]
    rate = {k: _median(by[k], "messages_per_s") / _median(one, "messages_per_s") for k in by}
    cpu = {k: _median(by[k], "orchestrators_cpu_ms_per_message") for k in by}
    hit = {k: _median(by[k], "cache_hit_rate") for k in by}
    cores = one[0]["cores"]
    spread = [r["messages_per_s"] for r in one]
    return [
        f"**Reading.** With one replica the orchestrator process kept "
        f"{_median(one, 'orchestrators_cores_used'):.2f} of the {cores} cores busy while the "
        f"machine was {_median(one, 'machine_busy_fraction'):.0%} busy (Postgres, RabbitMQ, "
        "the generator, the worker and whatever else runs on this shared machine): no core was "
        "idle for another replica to use, so more replicas could only move the same work "
        "between processes. Measured: "
        + ", ".join(f"{k} replicas {rate[k]:.2f}x" for k in more)
        + f" the rate of one (one replica's own passes spread {min(spread):,.0f} to "
        f"{max(spread):,.0f} /s). What replicas cost: the orchestrators' CPU per message rose "
        f"from {cpu[1]:.2f} ms to "
        + " and ".join(f"{cpu[k]:.2f} ms" for k in more)
        + ", and the snapshot cache's hit rate fell from "
        f"{hit[1]:.1%} to "
        + " and ".join(f"{hit[k]:.1%}" for k in more)
        + ": a signal for a run that lands on a replica not holding it is a miss there and "
        f"makes the holder's next step a miss (each re-reads the run's {one[0]['devices_per_run']}"
        "-client snapshot), "
        "and each process's group commits are smaller. Replicas pay where one orchestrator "
        "process is the limit: cores to spare on its host, or replicas on several hosts, with "
        "the database and the broker elsewhere. Sharding signals by run (so they land on the "
        "holder) would give back most of the cache misses; docs/architecture.md, "
        '"Replicas", says why it is not built.',
    ]


def markdown(out: dict[str, Any]) -> str:
    f, results = out["floor"], out["scenarios"]
    counts = sorted({r["replicas"] for r in results})
    by = {k: [r for r in results if r["replicas"] == k] for k in counts}
    one = by.get(1)
    first = results[0]
    passes = max(r["pass"] for r in results)

    def cell(k: int, key: str, fmt: str = "{:,.0f}") -> str:
        vals = [r[key] for r in by[k]]
        text = fmt.format(_median(by[k], key))
        if len(vals) > 1:
            text += " (" + ", ".join(fmt.format(v) for v in vals) + ")"
        return text

    def scale(k: int, key: str) -> str:
        return f"{_median(by[k], key) / _median(one, key):.2f}x" if one else ""

    head = ["replicas", "leases (runs each)", "register /s", "ready /s", "updates /s"]
    head += ["**messages /s**", "vs 1 replica", "/ db single-commit floor"]
    head += ["snapshot cache hits", "replies / registration", "events / decided", "load avg"]
    lines = [
        f"## Replicas: {first['runs']} runs x {first['devices_per_run']} light devices, "
        "1 to 3 orchestrator processes (RabbitMQ + Postgres)",
        "",
        f"`benchmarks/replicas.py`: {first['devices']:,} devices over {first['runs']} runs "
        f"speak the wire protocol from {THREADS} publisher threads (AMQP transactions of "
        f"{PER_TX}): register, signal ready, then one ~1.1 KB update each into round 1 of "
        "their run (all selected). N `fedmq orchestrator` replicas share the runs by lease "
        "(each holds between floor and ceil of runs / N) and compete for the shared queues; "
        "one Celery worker. Rates run from the first publish to the last message in the "
        "database; *messages /s* is register + ready + update messages over the three phases' "
        "time. Each scenario has fresh processes, vhost and database"
        + (
            f"; every replica count was measured {passes} times (median, then each pass)"
            if passes > 1
            else ""
        )
        + ".",
        "",
        "**The floor**, measured first in the same run (`benchmarks/floor.py`): RabbitMQ "
        f"consume + ack **{f['broker_consume_ack_per_s']:,.0f} /s**; PostgreSQL single-row "
        f"upsert, one commit each, **{f['db_single_commit_per_s']:,.0f} /s**; 100 to a commit "
        f"**{f['db_batched_rows_per_s']:,.0f} rows/s**.",
        "",
        "| " + " | ".join(head) + " |",
        "|---:|---|" + "---:|" * (len(head) - 2),
    ]
    for k in counts:
        rs = by[k]
        leases = ", ".join(
            "/".join(str(v) for v in sorted(r["leases_at_start"].values(), reverse=True))
            for r in rs[:1]
        )
        hit = _median(rs, "cache_hit_rate")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(k),
                    leases,
                    cell(k, "register_per_s"),
                    cell(k, "signals_per_s"),
                    cell(k, "updates_per_s"),
                    "**" + cell(k, "messages_per_s") + "**",
                    scale(k, "messages_per_s"),
                    f"{_median(rs, 'messages_per_s') / f['db_single_commit_per_s']:.2f}",
                    f"{hit:.1%}",
                    f"{_median(rs, 'replies_per_registration'):.2f}",
                    f"{_median(rs, 'events_per_decided'):.2f}",
                    f"{_median(rs, 'load_avg_1m_mean'):.1f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Where the CPU went, registration to the last update counted (medians): the "
        "orchestrator processes' own CPU (all replicas together) as cores busy on average and "
        "per message; the load generator's (this benchmark's process); the whole machine's "
        "busy CPU per message (shared: other work on it shows here too) and how busy it was.",
        "",
        "| replicas | orchestrators: cores busy | orchestrators: CPU ms / message "
        "| generator: CPU ms / message | machine: busy CPU ms / message | machine busy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in counts:
        rs = by[k]
        lines.append(
            f"| {k} | {_median(rs, 'orchestrators_cores_used'):.2f} "
            f"| {_median(rs, 'orchestrators_cpu_ms_per_message'):.2f} "
            f"| {_median(rs, 'generator_cpu_ms_per_message'):.2f} "
            f"| {_median(rs, 'machine_busy_cpu_ms_per_message'):.2f} "
            f"| {_median(rs, 'machine_busy_fraction'):.0%} of {rs[0]['cores']} cores |"
        )
    losses = [r["lost"] + r["devices"] - r["aggregated"] for r in results]
    lines += [
        "",
        "Updates lost (not in exactly one participation row, or not aggregated): "
        + (
            f"**0** in every scenario ({len(results)})."
            if not any(losses)
            else ", ".join(
                f"{r['replicas']} replicas, pass {r['pass']}: {x}"
                for r, x in zip(results, losses, strict=True)
            )
            + "."
        ),
        "",
        *reading(by, f),
        "",
        "What each replica did (the last pass of each count): messages it consumed from the "
        "signals and updates queues, stored updates its counter thread counted (its runs' "
        "only; the rest were counted by its ticks), snapshot-cache hits / misses, peak memory.",
        "",
        "| replicas | replica | runs held | signals consumed | updates stored | updates counted "
        "| cache hits / misses | peak MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in counts:
        r = by[k][-1]
        for rep in r["per_replica"]:
            handled = rep.get("handled", {})
            lines.append(
                f"| {k} | {rep['id']} | {rep.get('runs', 0)} "
                f"| {handled.get(topology.SIGNALS_QUEUE, 0):,} "
                f"| {handled.get(topology.UPDATES_QUEUE, 0):,} | {handled.get('counted', 0):,} "
                f"| {rep.get('cache_hits', 0):,} / {rep.get('cache_misses', 0):,} "
                f"| {rep['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
