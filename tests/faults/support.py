"""What the fault scenarios share: repetition count, the figures each scenario reports, and
raw update publishing for devices that misbehave on the wire (half uploads, replays,
duplicates) beyond what ``LightClient`` scripts."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from protocol import auth, chunking, topology
from protocol.codec import Encoding, encode
from protocol.messages import UpdateMeta
from tests.integration.lightclient import ENVELOPE_HEADER, LightClient
from tests.integration.orchestrator_harness import Harness, RunView

RUNS_ENV = "FEDMQ_FAULT_RUNS"
REPORT_ENV = "FEDMQ_FAULT_REPORT"  # a JSON-lines file each scenario appends its tally to
SEED_ENV = "FEDMQ_FAULT_SEED"


def runs(default: int = 1) -> int:
    """Random repetitions per scenario: small in CI, larger in the local reliability run."""
    return max(1, int(os.environ.get(RUNS_ENV, default)))


def scenario(key: str, title: str) -> tuple[random.Random, Tally]:
    """The scenario's random source and its tally. Seeded from FEDMQ_FAULT_SEED when set (to
    replay a failure), else from the clock; the seed goes into the tally."""
    seed = int(os.environ.get(SEED_ENV) or time.time_ns() % 2**32)
    return random.Random(f"{key}/{seed}"), Tally(title, seed)


@dataclass
class Tally:
    """One scenario's figures for docs/reliability.md."""

    scenario: str
    seed: int
    runs: int = 0
    sent: int = 0  # update messages put on the wire (duplicates and refused ones included)
    acknowledged: int = 0  # update.accepted notices the devices saw
    stored: int = 0  # acknowledged updates found in exactly one participation row
    aggregated: int = 0  # updates in closed rounds' models, recomputed by the invariant check
    duplicates: int = 0  # duplicate or replayed deliveries injected
    losses: int = 0  # acknowledged but not stored exactly once (the check fails on any)
    recovery_s: list[float] = field(default_factory=list)

    def write(self) -> None:
        path = os.environ.get(REPORT_ENV)
        if path:
            with Path(path).open("a") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def acked(clients: list[LightClient]) -> list[str]:
    """Message ids of the updates the devices saw acknowledged."""
    return [
        n.correlation_id
        for c in clients
        for n in list(c.notices)
        if n.kind == "update.accepted" and n.correlation_id
    ]


def wait_acked(h: RunView, clients: list[LightClient], n: int, timeout: float = 20) -> None:
    """The notices trail the commit a little (outbox -> device queue -> device thread)."""
    h.wait(lambda: len(set(acked(clients))) >= n, timeout, f"{n} update.accepted notices")


@dataclass
class RawUpdate:
    """An update as it travels: the envelope and the chunks, ready to publish again."""

    meta: UpdateMeta
    blob: bytes
    chunks: list[chunking.Chunk]

    def publish(self, h: RunView, first: int = 0, last: int | None = None) -> int:
        """Publish chunks ``[first, last)``; returns how many went out."""
        envelope = self.meta.model_dump_json()
        key = topology.update_routing_key(self.meta.run_id, self.meta.round, self.meta.client_id)
        part = self.chunks[first:last]
        for chunk in part:
            headers = {**chunking.to_headers(chunk), ENVELOPE_HEADER: envelope}
            h.bus.publish(topology.UPDATES_EXCHANGE, key, chunk.data, headers=headers)
        return len(part)


def make_update(
    c: LightClient,
    round: int,
    base_version: int,
    *,
    client_id: str | None = None,
    token: str | None = None,
    chunk_size: int = 128,
    seed: int = 0,
) -> RawUpdate:
    """A deterministic fp32 delta update of ``c`` (or spoofed as ``client_id``/``token``)."""
    assert c.client_id and c.token
    base = c.models[base_version]
    g = np.random.default_rng(
        seed or int(hashlib.sha256(f"{c.name}/{round}".encode()).hexdigest()[:8], 16)
    )
    trained = {k: v + g.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    blob = encode(trained, Encoding.FP32, base=base, base_version=str(base_version))
    meta = auth.sign(
        UpdateMeta(
            run_id=c.run_id,
            client_id=client_id or c.client_id,
            round=round,
            base_model_version=base_version,
            num_samples=c.num_samples,
            encoding="fp32",
            is_delta=True,
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            blob_bytes=len(blob),
            metrics={"loss": 0.5},
        ),
        token or c.token,
    )
    return RawUpdate(meta, blob, chunking.split(blob, chunk_size))


def wait_ready(h: RunView, clients: list[LightClient], timeout: float = 40) -> None:
    want = {c.client_id for c in clients}
    h.wait(
        lambda: all(h.client_state(cid or "") == "ready" for cid in want),
        timeout,
        f"{len(want)} ready clients",
    )


def wait_models(h: RunView, clients: list[LightClient], version: int, timeout: float = 30) -> None:
    h.wait(
        lambda: all(version in c.models for c in clients), timeout, f"model v{version} everywhere"
    )


def kill_worker_in_each_aggregation(
    h: Harness,
    r: random.Random,
    tally: Tally,
    worker: subprocess.Popen[bytes],
    rounds: int,
    verify: Callable[[], object],
    *,
    max_delay_s: float,
    start_timeout: float,
    done_timeout: float,
    what: str = "aggregation of round",
) -> subprocess.Popen[bytes]:
    """For each round 1..``rounds``: once its aggregation has started, wait a random time up
    to ``max_delay_s``, SIGKILL the worker and start another, wait for the round to be done,
    record the recovery and check the invariant. Returns the worker left running."""
    for k in range(1, rounds + 1):
        h.wait(
            lambda k=k: any(e.round == k for e in h.events("aggregate.started")),
            start_timeout,
            f"{what} {k} to start",
        )
        time.sleep(r.uniform(0.0, max_delay_s))
        h.procs.kill(worker)
        killed = time.monotonic()
        worker = h.procs.worker()
        h.wait_round_state(k, {"done"}, done_timeout)
        tally.recovery_s.append(round(time.monotonic() - killed, 2))
        verify()
        tally.runs += 1
    return worker
