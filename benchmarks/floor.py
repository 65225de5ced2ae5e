"""The physical floor under the orchestrator, measured on the same servers in the same run:
what RabbitMQ and PostgreSQL themselves sustain, so that fedmq's figures can be read as a
fraction of it on a shared, noisy machine.

- broker: consume + ack of 200-byte persistent messages from a durable queue (one consumer,
  prefetch 256, acks one by one), after they were published in AMQP transactions;
- database, one commit each: a single-row upsert per transaction (what one message per
  transaction costs at the least);
- database, batched: the same upserts, 100 to a transaction (what a group commit can reach);
- database, large writes: 1 MiB ``bytea`` rows, one per transaction (MB/s).

    .venv/bin/python benchmarks/floor.py     # prints the figures (scratch vhost + database)
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psycopg
from _scratch import drop_scratch, make_scratch
from sqlalchemy import make_url

from protocol.bus import Batching, Delivery, Outgoing, connect
from protocol.topology import Queue, Topology


def _pg(db_url: str) -> psycopg.Connection[Any]:
    u = make_url(db_url)
    return psycopg.connect(
        host=u.host, port=u.port or 5432, user=u.username, dbname=u.database, password=u.password
    )


def broker_consume_per_s(amqp_url: str, n: int = 5000) -> float:
    bus = connect(amqp_url)
    try:
        bus.declare(Topology(queues=(Queue("floor", dead_letter_exchange=None),)))
        body = os.urandom(100).hex().encode()  # 200 bytes
        for i in range(0, n, 100):
            bus.publish_many([Outgoing("", "floor", body) for _ in range(min(100, n - i))])
        done = threading.Event()
        count = [0]

        def handle(ds: list[Delivery]) -> None:
            for d in ds:
                d.ack()
            count[0] += len(ds)
            if count[0] >= n:
                done.set()

        t0 = time.perf_counter()
        consumer = bus.consume_batches(
            "floor", handle, batching=Batching(max_messages=256, linger_s=0), prefetch=256
        )
        done.wait(120)
        elapsed = time.perf_counter() - t0
        consumer.stop()
        return count[0] / elapsed
    finally:
        bus.close()


def db_rates(db_url: str) -> dict[str, float]:
    with _pg(db_url) as c:
        c.execute("CREATE TABLE floor_kv (k int PRIMARY KEY, v bigint NOT NULL)")
        c.execute("CREATE TABLE floor_blob (k int PRIMARY KEY, data bytea NOT NULL)")
        c.commit()
        upsert = (
            "INSERT INTO floor_kv VALUES (%s, 1) ON CONFLICT (k) DO UPDATE SET v = floor_kv.v + 1"
        )
        n = 1000
        t0 = time.perf_counter()
        for i in range(n):
            c.execute(upsert, (i,))
            c.commit()
        single = n / (time.perf_counter() - t0)
        n, per = 20000, 100
        t0 = time.perf_counter()
        with c.cursor() as cur:
            for start in range(0, n, per):
                cur.executemany(upsert, [(k,) for k in range(start, start + per)])
                c.commit()
        batched = n / (time.perf_counter() - t0)
        blob = os.urandom(1 << 20)
        n = 100
        t0 = time.perf_counter()
        for i in range(n):
            c.execute("INSERT INTO floor_blob VALUES (%s, %s)", (i, blob))
            c.commit()
        large = n * len(blob) / 1e6 / (time.perf_counter() - t0)
    return {
        "db_single_commit_per_s": single,
        "db_batched_rows_per_s": batched,
        "db_large_write_mb_per_s": large,
    }


def measure(amqp_url: str, db_url: str) -> dict[str, float]:
    return {"broker_consume_ack_per_s": broker_consume_per_s(amqp_url), **db_rates(db_url)}


def main() -> None:
    scratch = make_scratch("fedmq_floor")
    try:
        print(json.dumps(measure(scratch.amqp_url, scratch.db_url), indent=2))
    finally:
        drop_scratch(scratch)


if __name__ == "__main__":
    main()
