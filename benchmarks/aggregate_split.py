"""Hierarchical aggregation benchmark: K ResNet-18 bf16 updates folded by real Celery workers.

One round of K updates (ResNet-18, ImageNet head, bf16 deltas + zstd, ~15 MiB each, all
distinct blobs by default) is stored once in a scratch PostgreSQL database; several runs
point their round 1 at the same blobs, and each is aggregated by ``fedmq.aggregate``
sent through a scratch RabbitMQ vhost to ``celery worker`` processes (concurrency 1 each,
as deployed), the database as result backend:

- *flat, 1 worker*: the round folded in one task (``split_threshold`` above K);
- *P parts, 1 worker*: split into P parts, folded one after the other by one process;
- *P parts, 2 workers*: the same on two worker processes.

The time is the orchestrator's view, ``send_task`` to the result, best of ``--repeats``
(the configurations take turns, so a burst of someone else's load hits all alike). The
split rounds' models are compared with the flat one's (float32 ulps).

Second table: paged blob reads (``PagedLoader``) against one transaction per blob, for
1,000 small updates (the embedded mode's case), on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/aggregate_split.py           # K = 1000, writes docs + JSON
    .venv/bin/python benchmarks/aggregate_split.py --quick   # K = 40, prints, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine, machine_line, publish, write_section
from _scratch import Scratch, drop_scratch, make_scratch
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import BlobKind
from learning.models import resnet18
from protocol.codec import Encoding, decode, encode
from workers.app import AGGREGATE_TASK, create_app
from workers.config import WorkerConfig
from workers.tasks.common import blob_loader

ROOT = Path(__file__).resolve().parents[1]
STRIDE = 9973  # client i's noise starts STRIDE * i floats into a shared pool: all distinct
MiB = 1 << 20


# --- the updates ------------------------------------------------------------------------


def base_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = resnet18(num_classes=1000)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


_POOL: np.ndarray | None = None
_BASE: dict[str, np.ndarray] | None = None


def _init_encoder(k: int) -> None:
    global _POOL, _BASE
    _BASE = base_weights()
    n = sum(v.size for v in _BASE.values() if v.dtype == np.float32)
    _POOL = (1e-3 * np.random.default_rng(1).standard_normal(n + k * STRIDE)).astype(np.float32)


def _client_blob(i: int) -> bytes:
    """Client i's bf16 delta: base + a window of the noise pool (distinct for each i)."""
    assert _POOL is not None and _BASE is not None
    client: dict[str, np.ndarray] = {}
    pos = i * STRIDE
    for name, v in _BASE.items():
        if v.dtype == np.float32:
            client[name] = v + _POOL[pos : pos + v.size].reshape(v.shape)
            pos += v.size
        else:
            client[name] = v
    return encode(client, Encoding.BF16, base=_BASE, base_version="0")


def store_updates(url: str, k: int, distinct: int) -> list[str]:
    """Encode ``distinct`` client blobs on two processes and store them; the K updates
    cycle through them (their SHA-256s, in client order)."""
    engine = make_engine(url)
    shas: list[str] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, initializer=_init_encoder, initargs=(distinct,)) as pool:
        batch: list[bytes] = []
        for blob in pool.map(_client_blob, range(distinct), chunksize=4):
            batch.append(blob)
            if len(batch) == 8:
                shas += _put(engine, batch)
                batch = []
        shas += _put(engine, batch)
    engine.dispose()
    print(f"stored {distinct} distinct updates in {time.perf_counter() - t0:.0f} s", flush=True)
    return [shas[i % distinct] for i in range(k)]


def _put(engine: Any, blobs: list[bytes]) -> list[str]:
    with session_scope(engine) as s:
        return [blobstore.put(s, b, BlobKind.UPDATE) for b in blobs]


def make_run(url: str, name: str, shas: list[str], aggregation: dict[str, int]) -> str:
    """A run whose version 0 is the base and whose round 1 holds the K updates ``shas``
    (client ids sorted, so every run folds the blobs in the same order)."""
    base = base_weights()
    engine = make_engine(url)
    with session_scope(engine) as s:
        run = q.create_run(s, name, {"strategy": {"name": "fedavg"}, "aggregation": aggregation})
        mv, _ = q.create_model_version(
            s, run.id, blobstore.put(s, encode(base, Encoding.FP32), BlobKind.MODEL)
        )
        entries: list[tuple[str, str, dict[str, Any]]] = [
            (f"c{i:04d}", q.hash_token(f"{name}-{i}"), {}) for i in range(len(shas))
        ]
        clients = sorted(q.register_clients(s, run.id, entries))
        rnd = q.create_round(
            s, run.id, 1, quorum=len(shas), selected=clients, base_version_id=mv.id
        )
        rows = [
            {"client_id": c, "update_sha": sha, "num_samples": 100 + i % 997, "bytes": 0}
            for i, (c, sha) in enumerate(zip(clients, shas, strict=True))
        ]
        q.record_updates(s, rnd.id, rows)
        run_id = run.id
    engine.dispose()
    return run_id


# --- workers ------------------------------------------------------------------------------


@contextlib.contextmanager
def celery_workers(
    scratch: Scratch, count: int, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes on the aggregate queue, concurrency 1 each; waits until
    each says it is ready, and kills them (process group) afterwards."""
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": scratch.amqp_url,
        "FEDMQ_DATABASE_URL": scratch.db_url,
        "FEDMQ_TASK_TIMEOUT_S": "3600",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FEDMQ_RESULT_BACKEND", None)
    procs = []
    files = []
    try:
        for i in range(count):
            path = logs / f"worker-{count}-{i}-{time.time_ns()}.log"
            out = path.open("wb")
            files.append((path, out))
            cmd = [
                *(sys.executable, "-m", "celery", "-A", "workers.app", "worker"),
                *("-Q", "aggregate", "--concurrency", "1", "--pool", "prefork"),
                *("--loglevel", "INFO", "-n", f"w{i}-{time.time_ns()}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ]
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            procs.append(proc)
        deadline = time.monotonic() + 120
        while not all(" ready." in p.read_text(errors="replace") for p, _ in files):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start:\n" + _tails(files))
            time.sleep(0.2)
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        for _, out in files:
            out.close()


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU seconds of the worker processes and their pool processes so far:
    the work done, which other people's load on a shared machine does not inflate the
    way it inflates wall time."""
    tick = os.sysconf("SC_CLK_TCK")

    def tree(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick + sum(tree(int(k)) for k in kids)

    return sum(tree(p.pid) for p in procs)


def _tails(files: list[tuple[Path, Any]]) -> str:
    return "\n".join(p.read_text(errors="replace")[-2000:] for p, _ in files)


def aggregate(scratch: Scratch, run_id: str) -> float:
    client = create_app(WorkerConfig(database_url=scratch.db_url, broker_url=scratch.amqp_url))
    try:
        t0 = time.perf_counter()
        out = client.send_task(AGGREGATE_TASK, args=[run_id, 1, 1]).get(timeout=3600)
        wall = time.perf_counter() - t0
    finally:
        client.close()
    assert out["created"], out
    return wall


def version(url: str, run_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    engine = make_engine(url)
    with session_scope(engine) as s:
        mv = q.get_model_version(s, run_id, 1)
        assert mv is not None
        metrics, tensors = dict(mv.metrics), decode(blobstore.get(s, mv.blob_sha)).tensors
    engine.dispose()
    return metrics, tensors


def ulps(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[int, float]:
    """Largest difference in float32 ulps over every float tensor, and the fraction of
    parameters that are bit-identical."""
    worst, same, total = 0, 0, 0
    for name, x in a.items():
        if x.dtype != np.float32:
            continue
        ia, ib = x.view(np.int32).astype(np.int64), b[name].view(np.int32).astype(np.int64)
        worst = max(worst, int(np.abs(ia - ib).max(initial=0)))  # same sign here: ulps
        same += int(np.count_nonzero(ia == ib))
        total += x.size
    return worst, same / total


# --- paged reads --------------------------------------------------------------------------


def paged_reads(pg_url: str, k: int = 1000) -> list[dict[str, Any]]:
    """Read K small update blobs one transaction each vs a page at a time."""
    rng = np.random.default_rng(3)
    shapes = {"fc1.weight": (64, 32), "fc2.weight": (10, 64)}
    blobs = [
        encode({n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()})
        for _ in range(k)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, url in (("SQLite", f"sqlite:///{tmp}/paged.sqlite"), ("PostgreSQL", pg_url)):
            migrations.upgrade(url)
            engine = make_engine(url)
            shas = _put(engine, blobs)
            factory = make_sessionmaker(engine)

            def read_all(load: Callable[[str], bytes], shas: list[str] = shas) -> None:
                for sha in shas:
                    load(sha)

            def one_by_one_job(f: sessionmaker[Session] = factory) -> None:
                read_all(blob_loader(f))

            def paged_job(f: sessionmaker[Session] = factory, order: list[str] = shas) -> None:
                read_all(blob_loader(f, order))

            one_by_one, paged = _best(one_by_one_job), _best(paged_job)
            engine.dispose()
            rows.append({"backend": backend, "k": k, "bytes": sum(map(len, blobs)) // k,
                         "one_by_one_s": one_by_one, "paged_s": paged})  # fmt: skip
    return rows


def _best(job: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - t0)
    return best


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K = 40, print only")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=None, help="distinct blobs (default K)")
    ap.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--render", type=Path, help="rewrite the docs from this results JSON")
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return
    k = 40 if args.quick else args.k
    distinct = min(k, args.distinct or k)
    info = machine()
    scratch = make_scratch("bench_split")
    logs = Path(tempfile.mkdtemp(prefix="bench-split-"))
    try:
        migrations.upgrade(scratch.db_url)
        shas = store_updates(scratch.db_url, k, distinct)
        blob_mib = _mean_size(scratch.db_url, shas) / MiB
        # (label, workers, parts): parts 0 = flat.
        configs = [("flat", 1, 0)]
        for p in args.parts:
            configs += [(f"{p} parts", 1, p), (f"{p} parts", 2, p)]
        best: dict[tuple[str, int], float] = {}
        cpu: dict[tuple[str, int], float] = {}
        runs: dict[tuple[str, int], str] = {}
        samples: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for label, nworkers, parts in configs:
                agg = {"split_threshold": 10 * k} if not parts else {"split_threshold": 0,
                                                                      "parts": parts}  # fmt: skip
                run_id = make_run(scratch.db_url, f"{label}-{nworkers}-{rep}", shas, agg)
                with celery_workers(scratch, nworkers, logs) as procs:
                    idle = cpu_seconds(procs)  # starting up: not the round's
                    wall = aggregate(scratch, run_id)
                    used = cpu_seconds(procs) - idle
                key = (label, nworkers)
                print(f"{label}, {nworkers} worker(s): {wall:.1f} s, {used:.0f} CPU s", flush=True)
                if wall < best.get(key, float("inf")):
                    best[key], runs[key] = wall, run_id
                cpu[key] = min(used, cpu.get(key, float("inf")))
                samples.append({"config": label, "workers": nworkers, "parts": parts,
                                "repeat": rep, "wall_s": wall, "worker_cpu_s": used,
                                "loadavg_1m": os.getloadavg()[0]})  # fmt: skip
        results = _results(scratch, configs, best, cpu, runs)
        reads = paged_reads(scratch.db_url)
    finally:
        drop_scratch(scratch)
    load = os.getloadavg()
    report = {"k": k, "distinct": distinct, "repeats": args.repeats, "blob_mib": blob_mib,
              "configs": results, "samples": samples, "paged_reads": reads, "loadavg": load,
              "machine": info}  # fmt: skip
    md = _markdown(report)
    print(f"{md}\n\n{machine_line(info)}")
    if not args.quick:
        publish("aggregate-split", md, report)


def render(path: Path) -> None:
    """Rewrite the docs section from a results JSON (no measuring)."""
    data = json.loads(path.read_text())
    md = _markdown(data["results"])
    write_section("aggregate-split", f"{md}\n\n{machine_line(data['machine'])}\n")
    print(md)


def _mean_size(url: str, shas: list[str]) -> float:
    engine = make_engine(url)
    with session_scope(engine) as s:
        sizes = [blobstore.size(s, sha) for sha in dict.fromkeys(shas)]
    engine.dispose()
    return sum(sizes) / len(sizes)


def _results(
    scratch: Scratch,
    configs: list[tuple[str, int, int]],
    best: dict[tuple[str, int], float],
    cpu: dict[tuple[str, int], float],
    runs: dict[tuple[str, int], str],
) -> list[dict[str, Any]]:
    _, flat_model = version(scratch.db_url, runs[("flat", 1)])
    one = {label: best[(label, 1)] for label, _, _ in configs}
    out = []
    for label, nworkers, parts in configs:
        metrics, model = version(scratch.db_url, runs[(label, nworkers)])
        worst, same = ulps(model, flat_model)
        out.append({
            "config": label, "workers": nworkers, "parts": parts,
            "wall_s": best[(label, nworkers)], "worker_cpu_s": cpu[(label, nworkers)],
            "speedup_vs_flat": best[("flat", 1)] / best[(label, nworkers)],
            "speedup_vs_1_worker": one[label] / best[(label, nworkers)],
            "aggregate_s": metrics.get("aggregate_s"), "part_s": metrics.get("part_s"),
            "fold": metrics.get("fold"), "num_updates": metrics.get("num_updates"),
            "max_ulps_vs_flat": worst, "identical_vs_flat": same,
        })  # fmt: skip
    return out


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "## Hierarchical aggregation on Celery workers (`benchmarks/aggregate_split.py`)",
        "",
        f"One round of **K = {r['k']:,}** ResNet-18 updates (ImageNet head, 11.7 M parameters; "
        f"bf16 deltas + zstd, {r['blob_mib']:.1f} MiB each, {r['distinct']:,} distinct blobs: "
        f"{r['distinct'] * r['blob_mib'] / 1024:.1f} GiB in PostgreSQL), FedAvg, folded by "
        "`celery worker` processes (concurrency 1 each) through RabbitMQ, the database as "
        "result backend. *Wall*: `send_task` to the result (what the orchestrator waits), "
        f"best of {r['repeats']} (the configurations take turns); *vs 1 worker*: the same "
        "fold on one worker process; *in the task*: the version's `aggregate_s`; *parts*: "
        "each part task's own seconds; *worker CPU*: user + system seconds of the worker "
        "processes during the round (the work done, which other people's load does not "
        "inflate as it does wall time; PostgreSQL's side not included).",
        "",
        "| fold | worker processes | wall s | vs flat | vs 1 worker | in the task s | "
        "parts s | worker CPU s | max ulps vs flat | bit-identical |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in r["configs"]:
        parts = ", ".join(f"{x:.0f}" for x in c["part_s"]) if c["part_s"] else "—"
        lines.append(
            f"| {c['config']} | {c['workers']} | **{c['wall_s']:.1f}** | "
            f"{c['speedup_vs_flat']:.2f}x | {c['speedup_vs_1_worker']:.2f}x | "
            f"{c['aggregate_s']:.1f} | {parts} | {c['worker_cpu_s']:.0f} | "
            f"{c['max_ulps_vs_flat']} | "
            f"{100 * c['identical_vs_flat']:.2f}% |"
        )
    lines += [
        "",
        "Paged blob reads (`PagedLoader`: one transaction and two statements per page of up "
        "to 64 blobs / 32 MiB) against one transaction per blob, reading 1,000 small "
        "updates in fold order (best of 3):",
        "",
        "| backend | updates | bytes each | one by one s | paged s | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in r["paged_reads"]:
        lines.append(
            f"| {p['backend']} | {p['k']:,} | {p['bytes']:,} | {p['one_by_one_s']:.2f} | "
            f"{p['paged_s']:.2f} | {p['one_by_one_s'] / p['paged_s']:.1f}x |"
        )
    lines += ["", *_notes(r)]
    load = ", ".join(f"{x:.1f}" for x in r["loadavg"])
    lines += ["", f"Load average when the run ended: {load} on {r['machine']['cores']} cores."]
    return "\n".join(lines)


def _spread(samples: list[dict[str, Any]]) -> str:
    walls: dict[tuple[str, int], list[float]] = {}
    for x in samples:
        walls.setdefault((x["config"], x["workers"]), []).append(x["wall_s"])
    ratios = [max(w) / min(w) for w in walls.values() if len(w) > 1]
    if not ratios:
        return ""
    return (
        f" Repeats of one configuration differed by up to {max(ratios):.2f}x in wall time "
        "(every sample is in `benchmarks/results/aggregate-split.json`)."
    )


def _notes(r: dict[str, Any]) -> list[str]:
    by = {(c["parts"], c["workers"]): c for c in r["configs"]}
    flat = by[(0, 1)]
    out = []
    for (parts, workers), c in sorted(by.items()):
        if workers != 2:
            continue
        one = by[(parts, 1)]
        extra = [100 * (x["worker_cpu_s"] / flat["worker_cpu_s"] - 1) for x in (one, c)]
        out.append(
            f"- {parts} parts: two worker processes against one **{c['speedup_vs_1_worker']:.2f}x**"
            f" ({one['wall_s']:.0f} s to {c['wall_s']:.0f} s), against the flat fold on one "
            f"**{c['speedup_vs_flat']:.2f}x**. Worker CPU {extra[0]:+.0f}% (one worker) and "
            f"{extra[1]:+.0f}% (two) over the flat fold: per part a float64 partial sum "
            "encoded, stored, read back and decoded, and every task decodes the base model."
        )
    cores = r["machine"]["cores"]
    worst = max(c["max_ulps_vs_flat"] for c in r["configs"])
    same = min(c["identical_vs_flat"] for c in r["configs"])
    out.append(
        f"- This machine has {cores} cores, shared with other people's work: 2x is a ceiling "
        "the wall times cannot reach here, as PostgreSQL serves the blobs from the same cores "
        "and the flat fold already decodes in a second thread (decode-ahead)."
        + _spread(r.get("samples", []))
    )
    if worst == 0:
        out.append(
            "- Equality: every parameter of every split model is bit-identical to the flat "
            "fold's (the documented float64 bound allows up to one float32 ulp)."
        )
    else:
        out.append(
            f"- Equality: the split models differ from the flat one by at most {worst} "
            f"float32 ulp(s); {100 * same:.2f}% of parameters are bit-identical (the "
            "documented bound allows one ulp)."
        )
    return out


if __name__ == "__main__":
    main()
