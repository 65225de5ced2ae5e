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
    "orchestrator replica SIGKILL (3 replicas, 3 runs)": "kill -> its runs held by the others",
    "worker SIGKILL during aggregation": "kill -> round done (task redelivered)",
    "device dies mid-upload": "half upload -> round done (device sends again)",
    "Postgres connections terminated during ingest": "last outage -> round done",
    "duplicate x3, closed-round update, replays": "-",
    "device 2-3x slower than the deadline": "round open -> done at the deadline",
    "quorum never reached": "autorun -> round failed (2 attempts)",
    "deadline passed while the orchestrator was away": "restart -> round closed or retried",
    "broker outage": "broker back -> the open round done",
}


# The "secure defaults" table (issue 17): attack -> before -> after, one row per finding.
SECURE_DEFAULTS: list[tuple[str, str, str]] = [
    (
        "Broker away for minutes (scoped: a proxy in front of it cut, "
        "`tests/faults/test_broker_outage.py`)",
        "the orchestrator's consumers gave up after 20 reconnect attempts and it exited; the "
        "worker died; `fedmq up` restarted nothing; the open round stayed open 46 min past "
        "its deadline; 819 lines of tracebacks; the dashboard said nothing",
        "consumers reconnect for ever (capped, jittered backoff; one WARNING line per "
        "attempt, tracebacks at DEBUG); the worker retries for ever; the orchestrator holds "
        "deadlines and heartbeat timeouts while the broker is away, then closes or retries "
        "the open round; `fedmq up` restarts a service that exits (gives up only on a crash "
        "loop, loudly); every service's state is in `service_health` and on the dashboard; "
        "`fedmq fleet` and every long-running command stop within seconds of SIGTERM",
    ),
]


def _secure_defaults() -> str:
    rows = "".join(f"| {a} | {b} | {c} |\n" for a, b, c in SECURE_DEFAULTS)
    return "| attack | before | after |\n|---|---|---|\n" + rows


def _recovery(scenario: str) -> str:
    return next((v for k, v in RECOVERY.items() if scenario.startswith(k)), "-")


SUITE = ["tests/faults", "tests/unit/test_codec_fuzz.py", "tests/unit/test_poisoning.py"]


def run_suite(args: argparse.Namespace, report: Path) -> tuple[int, float, str]:
    env = {
        **os.environ,
        "FEDMQ_FAULT_RUNS": str(args.runs),
        "FEDMQ_FAULT_REPORT": str(report),
        "FEDMQ_FUZZ_EXAMPLES": str(args.fuzz_examples),
        "FEDMQ_GATEWAY_FUZZ_EXAMPLES": str(args.gateway_examples),
        "FEDMQ_BAD_INPUT_EXAMPLES": str(args.bad_input_examples),
        "FEDMQ_BROKER_OUTAGE_S": str(args.outage_s),
    }
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *SUITE,
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout",
            "1800",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    log = Path(tempfile.gettempdir()) / "fedmq-reliability-pytest.log"
    log.write_text(done.stdout + done.stderr)
    print(f"pytest output: {log}", file=sys.stderr)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return done.returncode, time.monotonic() - began, tail


def table(rows: list[dict]) -> str:
    head = (
        "| scenario | runs | updates sent | acknowledged | stored | aggregated "
        "| duplicates injected | losses | recovery time, median / max (s) | recovery measured |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for t in rows:
        rec = t["recovery_s"]
        shown = f"{statistics.median(rec):.1f} / {max(rec):.1f}" if rec else "-"
        lines.append(
            f"| {t['scenario']} | {t['runs']} | {t['sent']} | {t['acknowledged']} "
            f"| {t['stored']} | {t['aggregated']} | {t['duplicates']} | {t['losses']} | {shown} "
            f"| {_recovery(t['scenario'])} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="random repetitions per scenario")
    ap.add_argument("--fuzz-examples", type=int, default=5000, help="codec fuzz, per test")
    ap.add_argument("--gateway-examples", type=int, default=2000, help="gateway fuzz requests")
    ap.add_argument("--bad-input-examples", type=int, default=100, help="per consumer")
    ap.add_argument(
        "--outage-s",
        type=float,
        default=180,
        help="broker outage of tests/faults/test_broker_outage.py (issue 17: 3 minutes)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "tally.jsonl"
        rc, took, tail = run_suite(args, report)
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
        fuzz_examples=args.fuzz_examples,
        ci_fuzz=CI_FUZZ,
        poisoning=_poisoning(),
        secure_defaults=_secure_defaults(),
    )
    DOC.write_text(text + kept_sections())
    print(text)
    sys.exit(rc)


CI_FUZZ = 500  # tests/unit/test_codec_fuzz.py's default FEDMQ_FUZZ_EXAMPLES


def _poisoning() -> str:
    """Final test accuracy (%) per strategy and attack, from tests/unit/test_poisoning.py."""
    import torch

    if str(ROOT) not in sys.path:  # ``tests`` is not installed; run as a script, it is not
        sys.path.insert(0, str(ROOT))  # on the path either (only benchmarks/ is)
    from tests.unit import test_poisoning as t

    torch.set_num_threads(1)
    head = "| strategy | " + " | ".join(t.ATTACKS) + " |\n|---|" + "---:|" * len(t.ATTACKS)
    rows = [
        f"| {name} | " + " | ".join(f"{t._accuracy(name, a):.1f}" for a in t.ATTACKS) + " |"
        for name in ["fedavg", *t.ROBUST]
    ]
    return "\n".join([head, *rows]) + "\n"


def _bad_input(rows: list[dict]) -> str:
    if not rows:
        return "(the bad-input tests wrote no figures in this run)\n"
    return "\n".join(f"- {r['scenario']}: {r['detail']}" for r in rows) + "\n"


# Sections of docs/reliability.md written by hand (their figures come from tests that the
# fault suite does not run): kept, from their heading to the end, when the file is rewritten.
KEPT_HEADINGS = ("## Secure defaults",)


def kept_sections() -> str:
    old = DOC.read_text() if DOC.exists() else ""
    starts = [old.find(h) for h in KEPT_HEADINGS if h in old]
    return "\n" + old[min(starts) :] if starts else ""


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
  spoofs and late ones; *acknowledged* the distinct updates devices saw accepted; *stored*
  the acknowledged updates found in exactly one participation row; *aggregated* the updates
  in closed rounds' models, recomputed by the check. A slow device's update arrives after
  its round closed and is refused (sent, not acknowledged); in a failed round the updates
  are acknowledged and stored but never aggregated, by design.
- The Postgres scenario terminates every backend of the test database
  (`pg_terminate_backend`) three times per round instead of restarting the server: the
  local server is shared with other test runs, which a `pg_ctlcluster restart` would break.
- The device that dies mid-upload is a scripted client that publishes a random prefix of
  its chunks and stops; a real device process killed by SIGKILL (and a RabbitMQ restart)
  is covered by `tests/integration/test_federation_faults.py`, which restarts the broker
  once and is not repeated here because it disturbs every other test on the machine.
- A duplicate update for a round that already counted that client is acknowledged, not
  stored again and recorded as `update.duplicate` naming the counted update (the same update
  resent is told `update.accepted` again); an update from a client that was not counted
  arrives to a closed round as `update.refused` ("round N is not open").
- The Postgres scenario's orchestrator rides the cuts out by running a handler that met a
  connection error again (with backoff, up to 30 s); before that, a good update whose
  handler met two cuts in a row was dead-lettered and the round waited for its deadline.

## Bad input

Every consumer of the orchestrator (`tests/faults/test_bad_input.py`, real RabbitMQ and
Postgres) and every gateway route (`tests/faults/test_gateway_fuzz.py`, embedded):

{bad_input}
Each refused message is dead-lettered with an `x-fedmq-reason` header and recorded as an
event (`signal.refused`, `auth.rejected`, `register.rejected`, `update.refused`,
`command.result` with `accepted: false`) that the dashboard's event list shows; the test
checks dead letters and events match one for one, that no refusal is a handler crash, and
that each consumer still processes a good message afterwards. A chunk set with a gap is acked
and staged (it may still complete) and never stored. In CI the generated part is 40
mutations per consumer and 300 gateway requests.

Codec fuzz (`tests/unit/test_codec_fuzz.py`, hypothesis): three properties (spliced or
truncated blobs of every encoding; blobs whose JSON header is mutated and re-packed with a
valid CRC; arbitrary header and frame bytes), {fuzz_examples} examples each in this run,
{ci_fuzz} each in CI; decode returned or raised `CodecError` every time, within 1 s of CPU:
zero crashes. The hand-written codec corpus is `tests/unit/test_codec_corpus.py`.

## Secure defaults

What an outside attack on a stack started as the README shows (`fedmq up`, no operator
token, no broker accounts URL) found (issue 17), and what the defaults do now.

{secure_defaults}
## Trust

- Device and operator messages carry an HMAC under the sender's token (never the token);
  the orchestrator checks it (constant time, timestamp within `FEDMQ_AUTH_WINDOW_S`) on
  every signal, heartbeat, update chunk and command, against the client id the message
  names, before claiming its id. A MAC under client B's token on client A's id, a missing
  or changed one, a stale or future timestamp are refused (`auth.rejected` for signals,
  `update.refused` "bad MAC" for update chunks, `command.result` refused for commands;
  dead-lettered, nothing staged): see `test_wire_faults.py` (a spoofed update each round)
  and `test_bad_input.py`. A queue of the shared broker user bound to every exchange sees no
  token and no MAC key over a federation (`test_no_secret_on_the_wire.py`).
- Per-device broker users (`protocol/permissions.py`, `orchestrator/accounts.py`): with
  `FEDMQ_BROKER_ACCOUNTS_URL` set (Compose and Kubernetes set it), the shared `device` user
  may only register, and the orchestrator gives every registering device a RabbitMQ user of
  its own (name = client id, password = token) that may publish only `signal.<id>` and
  `update.<run>.<round>.<id>` and read and bind only its own queue. Measured on the live
  broker (scratch vhosts and users):
  - `tests/faults/test_broker_permissions.py`: the shipped enrollment user can register and
    nothing else (no registered client's key or queue, no updates, no commands, nothing of
    the orchestrator's); users made through the management API as the orchestrator makes
    them are refused another device's signal and update keys, its queue and bindings, the
    orchestrator's queues and exchanges; a revoked user cannot log in. The gateway's and
    dashboard's users cannot declare or delete the orchestrator's queues or exchanges.
  - `tests/faults/test_broker_accounts.py`: two `fedmq device` processes that know only the
    enrollment user register, reconnect as their own users and train two autorun rounds
    (every update counted, no refusal); a third client with her own user is refused by the
    broker when she publishes under a real device's signal or update key or reads its
    queue; kicked, her user is deleted and she cannot log in. With the management API
    refusing, a registration asking for a user is refused with the reason and nothing of it
    is kept.
- Poisoned updates (`tests/unit/test_poisoning.py`, digits, MLP, 10 IID clients, 10 rounds,
  client 0 malicious every round): final test accuracy (%).

{poisoning}
FedAvg collapses; FedMedian, FedTrimmedAvg (beta 0.2) and FedAvg with norm clipping (0.4,
just above the largest honest update norm) stay within 2 points of their clean runs.
"""


if __name__ == "__main__":
    main()
