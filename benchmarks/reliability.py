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
    "ingest process SIGKILL": "kill -> a new ingest process in its place",
}


# The "secure defaults" table (issue 17): attack -> before -> after, one row per finding;
# each "after" names the test that measures it.
SECURE_DEFAULTS: list[tuple[str, str, str]] = [
    (
        "Forged round announcement on the devices' queues (finding 1)",
        "devices took any announcement: one for the next round with its deadline past made "
        "every device mark that round and attempt seen and skip the real one; the round sat "
        "open to its deadline, and more forgeries could spend a run's attempts",
        "everything the orchestrator tells devices is Ed25519-signed over the exact bytes, "
        "kind, run and recipient (key made on first start, kept in `signing_keys`, shared "
        "by replicas); devices pin the key at registration (or from "
        "`FEDMQ_ORCHESTRATOR_KEY`) and drop what does not verify before recording anything. "
        "The attack in `test_forged_announcement.py`: round 1 completes on attempt 1 within "
        "half its 40 s deadline (on df8a2fa the same test times out: both devices skipped the "
        "real announcement)",
    ),
    (
        "Operator token from the source (finding 2)",
        "started without `FEDMQ_OPERATOR_TOKEN`, the gateway and the control queue accepted "
        "the constant written in the source: an outsider kicked a device and stopped autorun",
        "no default token: `fedmq up` generates one on first start (0600 in "
        "`FEDMQ_DATA_DIR/operator-token`, folder 0700) and prints where; the gateway and "
        "dashboard refuse to listen beyond loopback without one; the old constant is refused "
        "everywhere (`test_secure_defaults.py`: 401 at the gateway, refused on the control "
        "queue; `test_operator_token.py`)",
    ),
    (
        "A queue of the shared broker user bound to every exchange (finding 3)",
        "in 15 s: 8 client tokens (update headers) and the operator token (a command body)",
        "no secret on the bus: signals, heartbeats, update chunks and commands carry an "
        "HMAC-SHA256 under SHA-256(token), timestamped (`FEDMQ_AUTH_WINDOW_S`), checked in "
        "constant time before a message id is claimed; the registration answer's token is "
        "sealed to a one-time X25519 key (ChaCha20-Poly1305). `test_no_secret_on_the_wire.py`: "
        "154 messages over 2 rounds and a kick, no token, operator token or MAC key (on "
        "df8a2fa: each device's token in ~36 messages, the operator token in 2). Per-device "
        "broker users by default wherever RabbitMQ's management API answers: `fedmq up` "
        "makes an enrollment user that may only register, and each device gets a user of "
        "its own (`test_up.py` checks the fleet's); Compose and Kubernetes ship them",
    ),
    (
        "Registration flood over HTTP (finding 4)",
        "1,000 `POST /client` in 90 s: 1,000 x 201, 1,000 client rows, 1,000 durable queues "
        'never deleted; the broker then hung in recovery ("Recovering 1043 queues, available '
        'file handles: 927")',
        "per caller address 50 at once, then 1/s (`FEDMQ_GATEWAY_REGISTER_BURST`, "
        "`_RATE_PER_S`); past it 429 with `Retry-After`. With a burst of 5: 5 x 201 and "
        "995 x 429, 5 client rows, and no queue left 5 s after its device stopped reading "
        "(`test_bounds.py`, expiry 5 s)",
    ),
    (
        "Registration flood over AMQP",
        "every `Register` registered, without limit",
        "per broker user 10,000 at once, then 1,000/s (sized to a fleet restart; the shared "
        "enrollment user is one source); at most 100,000 clients per run "
        "(`FEDMQ_MAX_CLIENTS_PER_RUN`). 1,000 `Register`s with a burst of 50 and a cap of "
        "20: 20 registered, 29 refused for the cap, 950 for the rate, each answered "
        "`register.rejected` with its reason and `retry_after_s` (`test_bounds.py`)",
    ),
    (
        "Oversized registration metadata",
        "`device_info` stored as sent (up to the 1 MiB message limit)",
        "at most 4 KiB of JSON (`FEDMQ_MAX_DEVICE_INFO_BYTES`): 422 at the gateway; "
        "dead-lettered with the reason and answered on AMQP",
    ),
    (
        "Abandoned queues",
        "device and reply queues durable, never deleted",
        "device queues expire 1 h after their last reader (`FEDMQ_DEVICE_QUEUE_EXPIRES_S`), "
        "reply queues after 5 min; a reading or consuming device keeps its queue, and one "
        "that comes back declares it again (`test_bounds.py`). Queues of older releases: "
        "operator policies (below)",
    ),
    (
        "Broker away for minutes (finding 5; scoped: a proxy in front of it cut, "
        "`tests/faults/test_broker_outage.py`)",
        "the orchestrator's consumers gave up after 20 reconnect attempts and it exited; the "
        "worker died; `fedmq up` restarted nothing; the open round stayed open 46 min past "
        "its deadline; 819 lines of tracebacks; the dashboard said nothing",
        "consumers reconnect for ever (capped, jittered backoff; one WARNING line per "
        "attempt, tracebacks at DEBUG); the worker retries for ever; the orchestrator holds "
        "deadlines and heartbeat timeouts while the broker is away, then closes or retries "
        "the open round; `fedmq up` restarts a service that exits (gives up only on a crash "
        "loop, loudly); every service's state is in `service_health` and on the dashboard. "
        "A 180 s outage (the table above): every service alive, the open round done 7 to 26 s "
        "after the broker returned (within its 60 s deadline), 8/8 updates, 0 lost",
    ),
    (
        "Garbage to every exchange (finding 6)",
        "`dead-letters` had no consumer, length limit or expiry: 280 whole messages (update "
        "chunks up to 4 MiB) after the attack",
        "at most 10,000 messages, 256 MiB, 1 day each (`FEDMQ_DEAD_LETTERS_*`); every "
        "orchestrator consumes it and records each drop as a `dead_letter.dropped` event "
        "(reason, exchange, routing key, queue, size, broker user; never the body or "
        "headers). 50 dead letters into a bound of 20: the newest 20 kept, 20 recorded "
        "(`test_bounds.py`)",
    ),
    (
        "Many rounds (finding 6)",
        "sent `outbox` rows and `events` never deleted: 60k and 51k rows, 305 MB after "
        "~2,000 rounds",
        "sent outbox rows kept 1 h, events 7 days and at most the newest 100,000 per run, "
        "message ids 1 day (`FEDMQ_*_RETENTION_S`, `FEDMQ_EVENTS_MAX_PER_RUN`), pruned every "
        "minute in batches of 5,000. 2,000 rounds (30 outbox rows, 30 events a round, 1 h / "
        "1,000 events kept): at most 1,801 outbox rows and 2,000 events after each prune "
        "(`test_bounds.py`)",
    ),
    (
        "SIGTERM to `fedmq fleet` during autorun",
        "its waits never looked at the stop flag; devices were stopped one at a time, 15 s each",
        "exits within 15 s of SIGTERM or SIGINT, its devices gone (`test_fleet_sigterm.py`)",
    ),
]

# What the table's rows leave to the operator of a broker of their own.
SECURE_NOTES = """\
Queues declared by an older release (or by devices not yet upgraded) keep their old
arguments: the broker refuses new ones (PRECONDITION_FAILED), and fedmq then uses the queue
as it is and logs once. Their bounds come from two operator policies, which the broker
definitions of Compose and Kubernetes ship (`deploy/rabbitmq/definitions.json`); on a broker
of your own, set them once per vhost:

    rabbitmqctl set_operator_policy -p VHOST fedmq-device-queues '^device\\.' \\
        '{"expires":3600000}' --apply-to queues
    rabbitmqctl set_operator_policy -p VHOST fedmq-dead-letters '^dead-letters$' \\
        '{"max-length":10000,"max-length-bytes":268435456,"message-ttl":86400000}' \\
        --apply-to queues

Not bounded by fedmq: queues that a broker user declares itself (the enrollment user may
declare reply queues `device.r<16 hex>`: they expire by the policy above, but their number
in the meantime is the broker's to limit, e.g. `rabbitmqctl set_vhost_limits -p VHOST
'{"max-queues": 20000}'`); rate limits are per process (N gateways or replicas allow N times
the rate).
"""


def _secure_defaults() -> str:
    rows = "".join(f"| {a} | {b} | {c} |\n" for a, b, c in SECURE_DEFAULTS)
    return "| attack | before | after |\n|---|---|---|\n" + rows + "\n" + SECURE_NOTES


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
    DOC.write_text(text)
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
