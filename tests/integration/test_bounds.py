"""Bounded everything (issue 17, findings 4 and 6), on real RabbitMQ and Postgres: 1,000
registrations hit the limits and leave no queue behind, dead letters stay under their bound
and what is dropped is recorded, outbox and events stay bounded over 2,000 rounds."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Client, Event, OutboxItem, ProcessedMessage
from db.queries import dashboard as dq
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from gateway import GatewayConfig, create_app
from orchestrator.deadletters import DROPPED, DeadLetters
from orchestrator.retention import Pruner, Retention
from orchestrator.runs import create_run
from protocol import sealing
from protocol import topology as t
from protocol.bus import REASON_HEADER, Batching, Bus, Delivery, Outgoing, connect
from protocol.codec import Encoding, encode
from protocol.limits import device_info_bytes
from protocol.messages import Event as EventMsg
from protocol.messages import Register, Registered, parse_message
from tests.integration.lightclient import tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OPERATOR = "bounds-operator-token-for-tests"


def vhost_queues(amqp_url: str) -> set[str]:
    """The queues the broker holds in the test's vhost (without touching them: a passive
    declare would count as using a queue and postpone its expiry)."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "--no-table-headers"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def federation(amqp_url: str, pg_url: str, **changes: Any) -> Iterator[tuple[Bus, Any, str]]:
    """A migrated database with one run, and the real orchestrator service on the broker;
    ``changes``: settings other than the defaults."""
    migrations.upgrade(pg_url)
    settings = Settings(
        broker_url=amqp_url,
        database_url=pg_url,
        operator_token=OPERATOR,  # type: ignore[arg-type]
        **changes,
    )
    sessions = make_sessionmaker(make_engine(pg_url))
    with session_scope(sessions) as session:
        run_id = create_run(session, "bounds", encode(tiny_model(), Encoding.FP32))
    bus = connect(amqp_url)
    service = orchestrator_service(settings)
    service.start()
    try:
        yield bus, sessions, run_id
    finally:
        service.stop()
        bus.close()


def count(sessions: sessionmaker[Session], stmt: Any) -> int:
    with session_scope(sessions) as s:
        return int(s.scalar(stmt) or 0)


# --- finding 4: registration --------------------------------------------------------------


def test_a_thousand_gateway_registrations_hit_the_limit_and_leave_no_queue_behind(
    amqp_url: str, pg_url: str
) -> None:
    with federation(amqp_url, pg_url) as (bus, sessions, run_id):
        config = GatewayConfig(
            operator_token=OPERATOR,
            default_run=run_id,
            register_timeout_s=20.0,
            register_burst=5,
            register_rate_per_s=0.001,
            device_queue_expires_s=5.0,
        )
        with TestClient(create_app(config, bus, sessions)) as http:

            def register(i: int) -> Any:
                return http.post("/client", json={"display_name": f"flood-{i}"})

            answers = [register(i) for i in range(5)]
            # The accepted clients' queues exist until nobody has read them for 5 s.
            made = {t.device_queue(a.json()["client_id"]) for a in answers}
            assert made <= vhost_queues(amqp_url)
            answers += [register(i) for i in range(5, 1000)]
        statuses = [a.status_code for a in answers]
        assert statuses.count(201) == 5 and statuses.count(429) == 995, set(statuses)
        refused = answers[-1]
        assert int(refused.headers["Retry-After"]) >= 1
        assert "too many registrations from testclient" in refused.json()["reason"]
        assert count(sessions, select(func.count()).select_from(Client)) == 5
        wait_for(
            lambda: not {q for q in vhost_queues(amqp_url) if q.startswith("device.")},
            "the abandoned registrations' queues to expire",
        )


def test_amqp_registrations_past_the_rate_and_the_cap_are_answered_with_a_reason(
    amqp_url: str, pg_url: str
) -> None:
    limits = {"register_burst": 50, "register_rate_per_s": 0.001, "max_clients_per_run": 20}
    with federation(amqp_url, pg_url, **limits) as (bus, sessions, run_id):
        reply_key = f"r{uuid.uuid4().hex[:16]}"
        replies = t.declare_reply(bus, reply_key)
        key = t.signal_routing_key(reply_key)
        # First an oversized device_info: refused (and dead-lettered) with its reason.
        _, public = sealing.new_keypair()
        big = Register(
            run_id=run_id,
            display_name="big",
            reply_key=reply_key,
            reply_pub=public,
            device_info={f"k{i}": "y" * 1000 for i in range(5)},
        )
        bus.publish(t.SIGNALS_EXCHANGE, key, big.to_json())
        regs = [
            Register(run_id=run_id, display_name=f"d{i}", reply_key=reply_key, reply_pub=public)
            for i in range(999)
        ]
        bus.publish_many([Outgoing(t.SIGNALS_EXCHANGE, key, r.to_json()) for r in regs])
        answers: list[Any] = []

        def take(ds: list[Delivery]) -> None:
            for d in ds:
                answers.append(parse_message(d.body))
                d.ack()

        reader = bus.consume_batches(
            replies, take, batching=Batching(max_messages=256, linger_s=0), prefetch=256
        )
        try:
            wait_for(lambda: len(answers) >= 1000, "an answer to every registration", 60)
        finally:
            reader.stop()
        registered = [a for a in answers if isinstance(a, Registered)]
        refusals = [a for a in answers if isinstance(a, EventMsg)]
        assert {a.kind for a in refusals} == {"register.rejected"}
        reasons = [str(a.detail["reason"]) for a in refusals]
        by_id = {a.correlation_id: a for a in refusals}
        size = device_info_bytes(big.device_info)
        assert f"device_info is {size} bytes" in str(by_id[big.message_id].detail["reason"])
        assert "retry_after_s" not in by_id[big.message_id].detail  # retrying will not help
        assert len(registered) == 20
        assert sum("cap of 20 registered clients" in r for r in reasons) == 29
        assert sum("too many registrations from guest" in r for r in reasons) == 950
        assert all(
            a.detail["retry_after_s"] > 0 for a in refusals if a is not by_id[big.message_id]
        )
        assert count(sessions, select(func.count()).select_from(Client)) == 20
        # Only the malformed one was dead-lettered; the orchestrator's consumer recorded it.

        def dropped() -> list[Event]:
            with session_scope(sessions) as s:
                return q.list_events(s, kinds=[DROPPED])

        wait_for(lambda: len(dropped()) == 1, "the dead letter's record")
        assert "device_info" in str(dropped()[0].detail["reason"])


# --- finding 4: expiry ----------------------------------------------------------------------


def test_an_unread_device_queue_expires_and_a_reading_or_consuming_device_keeps_its_own(
    amqp_url: str,
) -> None:
    bus = connect(amqp_url)
    try:
        t.declare(bus)
        for name in ("gone", "polled", "consumed"):
            t.declare_device(bus, name, "run1", expires_s=1.0)
        consumer = bus.consume(t.device_queue("consumed"), lambda d: d.ack())
        listed: list[set[str]] = []
        # Listed while the devices go on reading (rabbitmqctl takes longer than the expiry
        # to start on a busy machine).
        lister = threading.Timer(3.0, lambda: listed.append(vhost_queues(amqp_url)))
        lister.start()
        try:
            while lister.is_alive():
                bus.get(t.device_queue("polled"), timeout=0.2)
        finally:
            consumer.stop()
        queues = listed[0]
        assert {"device.polled", "device.consumed"} <= queues
        assert "device.gone" not in queues
        # A device that comes back declares its queue again and hears its run at once.
        t.declare_device(bus, "gone", "run1", expires_s=1.0)
        bus.publish(t.DEVICES_EXCHANGE, t.broadcast_routing_key("run1"), b"hello")
        d = bus.get(t.device_queue("gone"), timeout=5)
        assert d is not None and d.body == b"hello"
        d.ack()
    finally:
        bus.close()


def test_a_queue_declared_before_its_bounds_is_used_as_it_is(amqp_url: str) -> None:
    bus = connect(amqp_url)
    try:
        # What an older release declared: no expiry, an unbounded dead-letters.
        old = t.Topology(queues=(t.dead_letter_queue().unbounded(),))
        t.declare(bus, t.exchanges() + old + t.device_topology("old", "run1", expires_s=None))
        bus.publish(t.DEVICES_EXCHANGE, t.device_routing_key("old"), b"kept")
        # The broker refuses other arguments (PRECONDITION_FAILED); the bus goes on with it.
        t.declare_device(bus, "old", "run1")
        t.declare(bus)
        bus.publish(t.DEAD_LETTER_EXCHANGE, "x", b"dead")
        assert bus.queue_depth(t.DEAD_LETTER_QUEUE) == 1
        assert bus.queue_depth(t.device_queue("old")) == 1
        d = bus.get(t.device_queue("old"), timeout=5)
        assert d is not None and d.body == b"kept"
        d.ack()
    finally:
        bus.close()


# --- finding 6: dead letters ----------------------------------------------------------------


def test_dead_letters_stay_under_their_bound_and_what_is_dropped_is_recorded_without_body(
    amqp_url: str, pg_url: str
) -> None:
    migrations.upgrade(pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    bus = connect(amqp_url)
    bounds = t.DeadLetterBounds(max_length=20, ttl_s=10.0)
    try:
        t.declare(bus, t.default_topology(bounds))
        secret = "token-that-must-not-be-stored"
        bus.publish_many(
            [
                Outgoing(
                    t.DEAD_LETTER_EXCHANGE,
                    f"update.run1.1.c{i}",
                    f"body-{secret}-{i}".encode(),
                    {REASON_HEADER: f"bad update {i}", "x-fedmq-envelope": secret},
                    f"m{i}",
                )
                for i in range(50)
            ]
        )
        assert bus.queue_depth(t.DEAD_LETTER_QUEUE) == 20  # the newest 20; the rest dropped
        consumer_of = DeadLetters(sessions)
        consumer = bus.consume_batches(
            t.DEAD_LETTER_QUEUE, consumer_of.handle_many, batching=Batching(max_messages=16)
        )
        try:
            wait_for(lambda: consumer_of.dropped == 20, "the dead letters to be consumed")
        finally:
            consumer.stop()
        with session_scope(sessions) as s:
            rows = q.list_events(s, kinds=[DROPPED], limit=100)
            assert len(rows) == 20
            assert {r.message_id for r in rows} == {f"m{i}" for i in range(30, 50)}
            assert all(r.run_id is None for r in rows)
            newest = rows[0].detail
            assert newest["reason"] == "bad update 49"
            assert newest["routing_key"] == "update.run1.1.c49"
            assert newest["bytes"] == len(f"body-{secret}-49")
            assert newest["user"] == "guest"
            stored = s.scalar(text("SELECT string_agg(detail::text, ' ') FROM events"))
            assert secret not in stored  # neither the body nor the headers
        # With nobody consuming, a dead letter lives for the queue's TTL at most.
        bus.publish(t.DEAD_LETTER_EXCHANGE, "x", b"late")
        assert bus.queue_depth(t.DEAD_LETTER_QUEUE) == 1
        wait_for(lambda: bus.queue_depth(t.DEAD_LETTER_QUEUE) == 0, "the TTL", 25)
    finally:
        bus.close()


# --- finding 6: retention -------------------------------------------------------------------

ROUNDS = 2000
EVENTS_PER_ROUND = 25  # about what a round of 8 devices records
OUTBOX_PER_ROUND = 30  # the finding: 60k outbox rows and 51k events after ~2,000 rounds
IDS_PER_ROUND = 10
ROUND_S = 60.0  # simulated time between rounds
PRUNE_EVERY = 20  # rounds (the job's interval: 20 simulated minutes)


def test_outbox_and_events_stay_bounded_over_2000_rounds(pg_url: str) -> None:
    migrations.upgrade(pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    with session_scope(sessions) as s:
        run_id = create_run(s, "long", encode(tiny_model(), Encoding.FP32))
        s.add(OutboxItem(run_id=run_id, kind="event", payload={"kind": "unsent"}))
    r = Retention(outbox_s=3600, events_s=86400, events_per_run=1000, processed_s=7200, batch=2000)
    pruner = Pruner(sessions, r)
    events, outbox = cast(Table, Event.__table__), cast(Table, OutboxItem.__table__)
    processed = cast(Table, ProcessedMessage.__table__)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    peaks = {"outbox": 0, "events": 0, "processed": 0}  # after each prune
    highs = dict(peaks)  # just before each prune: the bound plus one interval's rows

    def sizes() -> dict[str, int]:
        with session_scope(sessions) as s:
            return {
                name: int(s.scalar(select(func.count()).select_from(table)) or 0)
                for name, table in (
                    ("outbox", outbox),
                    ("events", events),
                    ("processed", processed),
                )
            }

    started = time.monotonic()
    for first in range(0, ROUNDS, PRUNE_EVERY):
        ev_rows, ob_rows, pm_rows = [], [], []
        for n in range(first, first + PRUNE_EVERY):
            ts = t0 + timedelta(seconds=n * ROUND_S)
            ev_rows += [
                {"run_id": run_id, "kind": "round.opened", "round": n, "ts": ts, "detail": {}}
                for _ in range(EVENTS_PER_ROUND)
            ]
            # Refusals of unknown runs and dead letters name no run: bounded on their own.
            ev_rows += [
                {"run_id": None, "kind": DROPPED, "round": None, "ts": ts, "detail": {}}
            ] * 5
            ob_rows += [
                {"run_id": run_id, "kind": "event", "payload": {}, "created_at": ts, "sent_at": ts}
                for _ in range(OUTBOX_PER_ROUND)
            ]
            pm_rows += [{"message_id": f"{n}-{i}", "ts": ts} for i in range(IDS_PER_ROUND)]
        with session_scope(sessions) as s:
            s.execute(insert(events), ev_rows)
            s.execute(insert(outbox), ob_rows)
            s.execute(insert(processed), pm_rows)
        for name, n in sizes().items():
            highs[name] = max(highs[name], n)
        now = t0 + timedelta(seconds=(first + PRUNE_EVERY) * ROUND_S)
        pruner.prune_runs([run_id])
        assert pruner.prune_shared(now) is not None
        for name, n in sizes().items():
            peaks[name] = max(peaks[name], n)
    elapsed = time.monotonic() - started

    # Sent outbox rows: one hour of rounds plus one prune interval, and the unsent row.
    assert peaks["outbox"] <= OUTBOX_PER_ROUND * (3600 / ROUND_S) + 1
    # Events: the newest 1,000 of the run and 1,000 of no run.
    assert peaks["events"] <= 2 * r.events_per_run
    assert peaks["processed"] <= IDS_PER_ROUND * (7200 / ROUND_S)
    assert highs["outbox"] <= peaks["outbox"] + OUTBOX_PER_ROUND * PRUNE_EVERY
    assert highs["events"] <= peaks["events"] + (EVENTS_PER_ROUND + 5) * PRUNE_EVERY
    with session_scope(sessions) as s:
        unsent = s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None))).all()
        assert [u.payload for u in unsent] == [{"kind": "unsent"}]  # never pruned
        # The dashboard still reads a run whose old events are gone.
        overview = dq.run_overview(s, run_id)
        assert overview is not None and overview.last_updated >= t0
        assert dq.count_events(s, run_id) == r.events_per_run
        page = dq.list_events_filtered(s, run_id, limit=10)
        assert page[0].round == ROUNDS - 1
        assert dq.event_kinds(s, run_id) == ["round.opened"]
        dq.list_refusals(s, run_id)
    print(f"2,000 rounds in {elapsed:.1f} s; after prunes {peaks}, before {highs}")


def test_only_one_replica_prunes_the_shared_tables_at_a_time(pg_url: str) -> None:
    migrations.upgrade(pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    pruner = Pruner(sessions, Retention())
    with session_scope(sessions) as other:
        other.execute(text("SELECT pg_advisory_xact_lock(:a, 0)"), {"a": 0x66656472})
        assert pruner.prune_shared() is None  # another replica holds it: skipped
    assert pruner.prune_shared() is not None
