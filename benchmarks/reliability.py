"""The longer local run of the fault suite (tests/faults) -> docs/reliability.md.

Runs ``pytest tests/faults`` with FEDMQ_FAULT_RUNS random repetitions per scenario, collects
the tally each scenario writes (FEDMQ_FAULT_REPORT) and writes the table: runs, updates
sent, acknowledged, stored, duplicates injected, losses, recovery time. Also records the
bad-input corpus size and the codec fuzz budget (tests/faults/test_bad_input.py).

    .venv/bin/python -m benchmarks.reliability --runs 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"

RECOVERY = {
    "orchestrator SIGKILL mid-round": "kill -> round done (a new process resumes it)",
    "worker SIGKILL during aggregation": "kill -> round done (task redelivered)",
    "device dies mid-upload": "half upload -> round done (device sends again)",
    "Postgres connections terminated during ingest": "last outage -> round done",
    "duplicate x3, closed-round update, replays": "-",
    "device 2-3x slower than the deadline": "round open -> done at the deadline",
    "quorum never reached": "autorun -> round failed (2 attempts)",
}


def run_suite(runs: int, report: Path) -> tuple[int, float, str]:
    env = {**os.environ, "FEDMQ_FAULT_RUNS": str(runs), "FEDMQ_FAULT_REPORT": str(report)}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    tail = "\n".join(done.stdout.strip().splitlines()[-3:])
    return done.returncode, time.monotonic() - began, tail


def table(rows: list[dict]) -> str:
    head = (
        "| scenario | runs | updates sent | acknowledged | stored | duplicates injected "
        "| losses | recovery time, median / max (s) | recovery measured |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for t in rows:
        rec = t["recovery_s"]
        shown = f"{statistics.median(rec):.1f} / {max(rec):.1f}" if rec else "-"
        lines.append(
            f"| {t['scenario']} | {t['runs']} | {t['sent']} | {t['acknowledged']} "
            f"| {t['stored']} | {t['duplicates']} | {t['losses']} | {shown} "
            f"| {RECOVERY.get(t['scenario'], '-')} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="random repetitions per scenario")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "tally.jsonl"
        rc, took, tail = run_suite(args.runs, report)
        rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    fuzz = [r for r in rows if r["scenario"].startswith("bad input")]
    faults = [r for r in rows if not r["scenario"].startswith("bad input")]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    text = RELIABILITY_DOC.format(
        when=when,
        machine=machine,
        runs=args.runs,
        took=took,
        result=tail,
        rc=rc,
        table=table(faults),
        bad_input=_bad_input(fuzz),
    )
    DOC.write_text(text)
    print(text)
    sys.exit(rc)


def _bad_input(rows: list[dict]) -> str:
    if not rows:
        return "(the bad-input tests wrote no figures in this run)\n"
    return "\n".join(f"- {r['scenario']}: {r['detail']}" for r in rows) + "\n"


RELIABILITY_DOC = """# Reliability

Written by `benchmarks/reliability.py` (do not edit by hand): the fault-injection suite
`tests/faults/` run with `FEDMQ_FAULT_RUNS={runs}` random repetitions per scenario, on real
RabbitMQ, Postgres, orchestrator and Celery worker processes; devices are scripted
`LightClient`s speaking the wire protocol.

- Run: {when} on {machine}; {took:.0f} s; pytest exit status {rc}: `{result}`.
- CI runs the same suite with the default `FEDMQ_FAULT_RUNS` (2 repetitions).

Every run of every scenario ends with the same invariant check (`tests/faults/invariants.py`):
every update a device saw acknowledged (`update.accepted`, by message id) is in exactly one
participation row; no client is counted twice in a round; every closed round's global model
equals FedAvg of exactly the updates recorded for it, recomputed in float64 from the stored
blobs; no round is stuck (each is done or failed, or open with its deadline ahead).
*Losses* counts acknowledged updates not stored exactly once: the check fails on any.

{table}
Notes on the scenarios:
- *sent* counts every update message put on the wire, including half uploads, duplicates,
  spoofs and late ones; *stored* counts updates in closed rounds (recomputed by the check).
  In the slow-device and quorum scenarios, updates that arrive after their round closed or
  in a failed round are sent but not stored, by design.
- The Postgres scenario terminates every backend of the test database
  (`pg_terminate_backend`) three times per round instead of restarting the server: the
  local server is shared with other test runs, which a `pg_ctlcluster restart` would break.
- The device that dies mid-upload is a scripted client that publishes a random prefix of
  its chunks and stops; a real device process killed by SIGKILL (and a RabbitMQ restart)
  is covered by `tests/integration/test_federation_faults.py`, which restarts the broker
  once and is not repeated here because it disturbs every other test on the machine.
- A duplicate update for a round that already counted that client is acknowledged and
  dropped without an event; an update from a client that was not counted arrives to a
  closed round as `update.refused` ("round N is not open").

## Bad input

{bad_input}"""


if __name__ == "__main__":
    main()
