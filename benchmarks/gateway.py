"""REST gateway benchmark: requests per second on loopback, measured by a load generator in a
second process (an asyncio + httpx client; no ``wrk`` needed), against ``fedmq gateway``
(one uvicorn process) on the real RabbitMQ + Postgres with the orchestrator running.

Scenarios (each ``--seconds`` long, after a short warm-up):
1. ``GET /transmitter``: the global model of a ResNet-18 run (version 0, the fp32 codec
   blob), body read in full by the client;
2. ``GET /transmitter`` with ``If-None-Match`` = its ETag: a device polling an unchanged
   model (304, no body);
3. ``POST /client/signal`` (``{"state": "heartbeat"}``): each request is published to
   ``fedmq.signals`` with a publisher confirm before the gateway answers 202.

The gateway, the load generator, RabbitMQ, Postgres and the orchestrator share this
machine's cores, so the figures are a floor for a dedicated host. A fresh vhost and
database are made and dropped.

    .venv/bin/python benchmarks/gateway.py            # writes docs/benchmarks.md + JSON
    .venv/bin/python benchmarks/gateway.py --quick    # 3 s per scenario, prints only
    .venv/bin/python benchmarks/gateway.py --load '{"url": ..., ...}'   # the load process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TOKEN = "bench-operator-token-gateway"


# --- the load generator (runs in its own process) ----------------------------------------------


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    """``concurrency`` connections each sending requests back to back for ``seconds``."""
    limits = httpx.Limits(max_connections=spec["concurrency"])
    timeout = httpx.Timeout(60.0)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    received = 0
    body = spec.get("json")

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one() -> None:
            nonlocal received
            began = time.perf_counter()
            async with client.stream(
                spec["method"], spec["url"], headers=spec["headers"], json=body
            ) as res:
                async for chunk in res.aiter_raw():
                    received += len(chunk)
            latencies.append(time.perf_counter() - began)
            statuses[res.status_code] = statuses.get(res.status_code, 0) + 1

        async def worker(until: float) -> None:
            while time.perf_counter() < until:
                await one()

        warm = time.perf_counter() + spec.get("warmup", 1.0)
        await asyncio.gather(*(worker(warm) for _ in range(spec["concurrency"])))
        statuses.clear()
        latencies.clear()
        received = 0
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + spec["seconds"]) for _ in range(spec["concurrency"])))
        elapsed = time.perf_counter() - began
    latencies.sort()
    done = len(latencies)
    return {
        "requests": done,
        "seconds": elapsed,
        "rps": done / elapsed,
        "mb_per_s": received / elapsed / 1e6,
        "statuses": statuses,
        "p50_ms": 1000 * latencies[done // 2] if done else None,
        "p99_ms": 1000 * latencies[min(done - 1, int(done * 0.99))] if done else None,
    }


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Start the load generator as a separate process and return what it measured."""
    out = subprocess.run(
        [sys.executable, __file__, "--load", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        timeout=spec["seconds"] + 120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the system under test ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def measure(seconds: float) -> dict[str, Any]:
    from sqlalchemy import create_engine, make_url, text

    from db import migrations
    from db.engine import make_engine, make_sessionmaker, session_scope
    from fedmq.demo import model_weights
    from orchestrator.runs import create_run
    from orchestrator.service import OrchestratorService, ServiceConfig
    from orchestrator.tasks import CeleryTaskRunner, result_backend_url
    from protocol.bus import connect
    from protocol.codec import Encoding, encode

    vhost = f"bench-gw-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    amqp = f"{AMQP.rsplit('/', 1)[0]}/{quote(vhost, safe='')}"
    admin_url = make_url(PG)
    dbname = f"bench_gw_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{dbname}"'))
    db = admin_url.set(database=dbname).render_as_string(hide_password=False)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    gateway: subprocess.Popen[bytes] | None = None
    engine = None
    bus = None
    service = None
    try:
        migrations.upgrade(db)
        engine = make_engine(db)
        sessions = make_sessionmaker(engine)
        blob = encode(model_weights("resnet18"), Encoding.FP32)
        with session_scope(sessions) as s:
            run_id = create_run(s, "bench-gateway", blob)
        bus = connect(amqp)
        tasks = CeleryTaskRunner(amqp, result_backend_url(db))
        service = OrchestratorService(bus, sessions, tasks, ServiceConfig(operator_token=TOKEN))
        service.start()
        env = {
            **os.environ,
            "FEDMQ_BROKER_URL": amqp,
            "FEDMQ_DATABASE_URL": db,
            "FEDMQ_OPERATOR_TOKEN": TOKEN,
            "FEDMQ_GATEWAY_RUN": run_id,
        }
        gateway = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", "gateway", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_http(f"{base}/openapi.json")
        reg = httpx.post(f"{base}/client", json={"display_name": "bench"}, timeout=30).json()
        auth = {"Authorization": f"Bearer {reg['token']}"}
        first = httpx.get(f"{base}/transmitter", headers=auth, timeout=60)
        etag = first.headers["etag"]
        common = {"seconds": seconds, "warmup": 1.0}
        scenarios = {
            "GET /transmitter": {
                **common,
                "method": "GET",
                "url": f"{base}/transmitter",
                "headers": auth,
                "concurrency": 4,
            },
            "GET /transmitter (If-None-Match, 304)": {
                **common,
                "method": "GET",
                "url": f"{base}/transmitter",
                "headers": {**auth, "If-None-Match": etag},
                "concurrency": 16,
            },
            "POST /client/signal (heartbeat)": {
                **common,
                "method": "POST",
                "url": f"{base}/client/signal",
                "headers": auth,
                "json": {"state": "heartbeat"},
                "concurrency": 16,
            },
        }
        load_before = os.getloadavg()[0]
        results = {name: run_load(spec) for name, spec in scenarios.items()}
        for name, r in results.items():
            r["concurrency"] = scenarios[name]["concurrency"]
        return {
            "model_bytes": len(first.content),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "results": results,
        }
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
        if service is not None:
            service.stop()
        if bus is not None:
            bus.close()
        if engine is not None:
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
        _rabbitmqctl("delete_vhost", vhost)


def table(data: dict[str, Any]) -> str:
    mb = data["model_bytes"] / 1e6
    load = data["load_average_1min"]
    rows = [
        "## REST gateway (`benchmarks/gateway.py`)",
        "",
        "Requests per second through `fedmq gateway` (one uvicorn process) on loopback, from a "
        "load generator in a second process (asyncio + httpx, each connection sending requests "
        "back to back), with the orchestrator, RabbitMQ and Postgres on the same machine. "
        f"The global model is ResNet-18's version 0 (fp32 codec blob, {mb:.1f} MB); a signal "
        "is answered once RabbitMQ confirmed its publish. The machine was shared: its 1-minute "
        f"load average was {load['before']:.1f} before and {load['after']:.1f} after the run.",
        "",
        "| route | connections | requests/s | MB/s | p50 ms | p99 ms | statuses |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in data["results"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        rows.append(
            f"| `{name}` | {r['concurrency']} | {r['rps']:.1f} | {r['mb_per_s']:.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {statuses} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per scenario, print only")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(_load(json.loads(args.load)))))
        return
    sys.path.insert(0, str(ROOT))
    data = measure(3.0 if args.quick else args.seconds)
    text_ = table(data)
    if args.quick:
        print(text_)
        return
    from _report import publish

    publish("gateway", text_, data)
    print(text_)


if __name__ == "__main__":
    main()
