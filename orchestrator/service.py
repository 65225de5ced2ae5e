"""The orchestrator service: bus consumers, the counter, a ticker, the outbox drainer and
task follower.

Signals and updates are consumed in batches, each batch one database transaction (a group
commit); commands and ticks are one each. Signals step the run's machine under its lock
(``store.step_many``); updates are stored without it and counted after, in batches, by the
counter thread (``orchestrator.counter``). A bus message is settled only after its
transaction committed, and side effects leave through the outbox after that.

Any number of these services may run against one database and broker, each a replica
(``orchestrator.replicas``): the queues are shared (any replica stores updates and applies
signals and commands, the run row lock orders them), while a run's ticks, task following,
counting and housekeeping run only on the replica that holds its lease.

While the broker is away (a consumer reconnecting) nothing of the devices can be heard, so
time stops for the machine: no ``Tick`` (no deadline, no heartbeat timeout) until the
consumers are back and ``outage_grace_s`` has passed for the devices to reconnect, say they
live and send what they held. Then a round whose deadline passed meanwhile closes (or fails
and is retried) at the first tick. Consumers never give up on the broker (``protocol.bus``).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.health import HealthReporter
from db.queries import orchestrator as oq
from orchestrator import metrics
from orchestrator.accounts import BrokerAccounts
from orchestrator.control import Control
from orchestrator.counter import Count, count
from orchestrator.deadletters import DeadLetters
from orchestrator.ingest import Ingest
from orchestrator.keys import SigningKeys
from orchestrator.outbox import Outbox
from orchestrator.replicas import Leases
from orchestrator.retention import Pruner, Retention
from orchestrator.signals import Signals
from orchestrator.state import (
    AggregationFailed,
    AggregationSucceeded,
    EvaluationFinished,
    Federation,
    Input,
    Tick,
)
from orchestrator.store import CACHE, StepInput, aggregate_task_id, evaluate_task_id, load
from orchestrator.tasks import TaskRunner
from protocol import topology
from protocol.bus import Batching, Bus, BusError, Consumer, Delivery
from protocol.bus.base import run_handler
from protocol.bus.health import LinkState, describe, summary
from protocol.codec import DecodeLimits
from protocol.limits import RegistrationLimits
from protocol.messages import RoundState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    # None: no operator configured; every command is refused (orchestrator/control.py).
    operator_token: str | None
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    chunk_size: int = 4 << 20
    max_message_bytes: int = 1 << 20
    tick_s: float = 0.5
    follow_s: float = 0.1
    # After a counting pass that counted something, the next one waits this long for more
    # stored updates (``_count_loop``): fewer, larger passes under a stream of updates.
    count_gap_s: float = 0.02
    task_timeout_s: float = 600.0
    reassembly_timeout_s: float = 300.0
    ingest_consumers: int = 2
    # Update blobs of this many latest rounds are kept; model versions always are.
    keep_update_rounds: int = 5
    prefetch: int = 16
    # Group commit (``Bus.consume_batches``): up to this many signals or one-chunk updates
    # in one transaction; None: one message a transaction. Signals are prefetched
    # ``signal_prefetch`` at a time (small messages); updates ``prefetch`` (up to 4 MiB
    # each), so ingest holds at most ``prefetch`` chunks per consumer in memory.
    batching: Batching | None = field(default_factory=Batching)
    signal_prefetch: int = 128
    # How long an update batch waits for more (``Batching.linger_s``). Longer than the
    # signals' 2 ms: a 1 MB update takes about a millisecond to arrive, so 2 ms gathered two
    # or three a transaction, and a transaction's fixed statements cost as much CPU as
    # validating and storing one of them; 10 ms took five to eight (docs/benchmarks.md).
    update_linger_s: float = 0.01
    # How long a consumer retries a message while the database is away before the bus's
    # requeue-once-then-dead-letter policy takes over.
    db_patience_s: float = 30.0
    # Replicas (orchestrator/replicas.py): this process's id (None: host-pid-random), how
    # long a run lease lasts unrenewed (a hung replica's runs move after this), how often
    # leases are renewed and the fair share looked at again.
    replica_id: str | None = None
    lease_ttl_s: float = 5.0
    lease_renew_s: float = 1.0
    # Only store updates: no signals, commands, leases, ticks, counting or outbox (a child
    # process of an orchestrator run with ``ingest_processes``).
    ingest_only: bool = False
    # After the broker was away: how long ticks stay held once the consumers are back, so
    # that devices (whose own reconnect backoff may be up to reconnect_backoff_max_s) come
    # back and heartbeat before a heartbeat timeout or a deadline is judged.
    outage_grace_s: float = 15.0
    # How often this process writes its row in ``service_health``; None: never (tests).
    health_period_s: float | None = None
    # Bounds (issue 17): registration limits, dead-letters' own limits (declared with the
    # topology) and whether this replica drains it, retention of outbox, events and ids.
    registration: RegistrationLimits = field(default_factory=RegistrationLimits)
    dead_letters: topology.DeadLetterBounds = field(default_factory=topology.DeadLetterBounds)
    consume_dead_letters: bool = True
    retention: Retention = field(default_factory=Retention)
    # How far a device's or operator's message may be dated from this clock
    # (protocol/auth.py); above ``reassembly_timeout_s``, so a slow upload's last chunk counts.
    auth_window_s: float = 900.0


class OrchestratorService:
    def __init__(
        self,
        bus: Bus,
        sessions: sessionmaker[Session],
        tasks: TaskRunner,
        config: ServiceConfig,
        *,
        clock: Callable[[], float] = time.time,
        accounts: BrokerAccounts | None = None,
    ) -> None:
        self.bus = bus
        self.sessions = sessions
        self.tasks = tasks
        self.config = config
        self.clock = clock
        # One signing key for the outbox (which signs) and registration (which hands it out).
        self.keys = SigningKeys(sessions)
        self.outbox = Outbox(
            bus, sessions, tasks, chunk_size=config.chunk_size, accounts=accounts, keys=self.keys
        )
        drain = self._drain_soon
        window = config.auth_window_s
        self.signals = Signals(
            sessions,
            drain,
            config.max_message_bytes,
            clock,
            accounts,
            config.registration,
            keys=self.keys,
            auth_window_s=window,
        )
        self.dead_letters = DeadLetters(sessions)
        self.pruner = Pruner(sessions, config.retention)
        self.ingest = Ingest(
            sessions,
            config.decode_limits,
            self._count_soon,
            clock,
            window,
            after_outbox=self._drain_soon,
        )
        self.control = Control(sessions, config.operator_token, drain, clock, window)
        self._consumers: list[Consumer] = []
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._counting = threading.Event()
        self._ticker: threading.Thread | None = None
        self._counter: threading.Thread | None = None
        # When this process first saw each followed task: its timeout counts from there.
        self._task_seen: dict[str, float] = {}
        # What this replica did, for its row in ``replicas`` (people and benchmarks).
        self._handled: Counter[str] = Counter()
        self._handled_lock = threading.Lock()  # consumers count from their own threads
        # The broker's last outage as this process saw it (time.monotonic()).
        self._away_since: float | None = None
        self._back_at: float | None = None
        self._outages = 0
        self._health: HealthReporter | None = None
        self.leases = Leases(
            sessions,
            replica_id=config.replica_id,
            ttl_s=config.lease_ttl_s,
            renew_s=config.lease_renew_s,
            on_gain=self._gained,
            on_inbox=lambda _: self._count_soon(),
            info=self._replica_info,
        )

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        topology.declare(self.bus, topology.default_topology(self.config.dead_letters))
        if self.config.ingest_only:
            # A process that only stores updates (``fedmq orchestrator --ingest-only``, a
            # child of one started with ingest processes): the inbox rows it writes wake
            # the counting replica through LISTEN/NOTIFY, and the refusals it queues go out
            # with that replica's next drain.
            self._start_ingest()
            log.info("orchestrator ingest process started")
            return
        # Made (first start) or read before anything is sent: the outbox drops an item whose
        # send fails for a reason other than the bus, and a database hiccup here is one.
        self.keys.signer()
        self._drain()  # what a previous process decided and did not send
        self.leases.start()  # the runs it works on, before the first tick
        self._consumers.append(
            self._consume(
                topology.SIGNALS_QUEUE,
                self.signals.handle,
                self.signals.handle_many,
                self.config.signal_prefetch,
            )
        )
        self._consumers.append(
            self.bus.consume(
                topology.CONTROL_QUEUE,
                self._observed(topology.CONTROL_QUEUE, self._patient(self.control.handle)),
                prefetch=8,
            )
        )
        if self.config.consume_dead_letters:
            self._consumers.append(
                self.bus.consume_batches(
                    topology.DEAD_LETTER_QUEUE,
                    self._observed_many(topology.DEAD_LETTER_QUEUE, self.dead_letters.handle_many),
                    # Dead letters may be 4 MiB update chunks: a small window keeps the
                    # bodies held in memory at 64 MiB.
                    batching=Batching(max_messages=16),
                    prefetch=16,
                )
            )
        self._start_ingest()
        self._ticker = threading.Thread(
            target=self._tick_loop, name="orchestrator-ticker", daemon=True
        )
        self._ticker.start()
        self._counting.set()  # what a previous process stored and did not count
        self._counter = threading.Thread(
            target=self._count_loop, name="orchestrator-counter", daemon=True
        )
        self._counter.start()
        if self.config.health_period_s is not None:
            self._health = HealthReporter(
                self.sessions,
                f"orchestrator {self.leases.id}",
                "orchestrator",
                self.health,
                period_s=self.config.health_period_s,
            ).start()
        log.info("orchestrator started")

    def _start_ingest(self) -> None:
        for _ in range(self.config.ingest_consumers):
            self._consumers.append(
                self._consume(
                    topology.UPDATES_QUEUE,
                    self.ingest.handle,
                    self.ingest.handle_many,
                    self.config.prefetch,
                )
            )

    def health(self) -> dict[str, Any]:
        """How this replica is doing: its connections (bus consumers and calls, the
        Postgres listener), whether ticks are held, the broker outages it rode out."""
        out = summary([*self.bus.health(), *self.leases.health()])
        out["ticks_held"] = self._away_since is not None
        out["broker_outages"] = self._outages
        out["runs"] = len(self.leases.owned())
        return out

    def _consume(
        self,
        queue: str,
        one: Callable[[Delivery], None],
        many: Callable[[list[Delivery]], None],
        prefetch: int,
    ) -> Consumer:
        """A consumer of ``queue``: batched (group commit) unless batching is off."""
        patient = self._patient(one)
        batching = self.config.batching
        if batching is not None and queue == topology.UPDATES_QUEUE:
            batching = replace(batching, linger_s=self.config.update_linger_s)
        if batching is None:
            return self.bus.consume(queue, self._observed(queue, patient), prefetch=prefetch)

        def run(ds: list[Delivery]) -> None:
            self._tally(queue, len(ds))
            began = time.perf_counter()
            try:
                handle(ds)
            finally:
                metrics.observe_batch(queue, len(ds), time.perf_counter() - began)
                metrics.observe_deliveries(queue, ds)

        def handle(ds: list[Delivery]) -> None:
            # A batch of one too: the batch path is one transaction where the update path
            # one at a time takes two (staging check, then store).
            try:
                many(ds)
                return
            except Exception as e:
                # Nothing of the batch committed (or it all did, and only settling failed:
                # then each message is found processed). One at a time, a bad message meets
                # the bus's policy alone and the rest go through.
                log.warning("batch of %d from %s failed (%r); one at a time", len(ds), queue, e)
            for d in ds:
                if not d.settled:
                    run_handler(d, patient)

        # A batch is bounded by the prefetch too (the broker sends no more un-acked).
        return self.bus.consume_batches(queue, run, batching=batching, prefetch=prefetch)

    @staticmethod
    def _observed_many(
        queue: str, handler: Callable[[list[Delivery]], None]
    ) -> Callable[[list[Delivery]], None]:
        def run(ds: list[Delivery]) -> None:
            try:
                handler(ds)
            finally:
                metrics.observe_deliveries(queue, ds)

        return run

    @staticmethod
    def _observed(queue: str, handler: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """``handler``, its message's outcome counted after it ran."""

        def run(d: Delivery) -> None:
            try:
                handler(d)
            finally:
                metrics.observe_deliveries(queue, [d])

        return run

    def _patient(self, handler: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """``handler`` run again (with backoff) while the database is away.

        A handler that raises has its message requeued once and then dead-lettered
        (``protocol.bus.run_handler``): right for a message that breaks the handler, wrong for
        a good update that met a database restart twice (found by the Postgres fault test,
        which cuts connections several times a round). Every handler is idempotent by message
        id and settles its message only after its transaction committed, so running it again
        on the same message is safe; once the message is settled, or after
        ``db_patience_s``, the error goes on to the bus's policy.
        """

        def run(d: Delivery) -> None:
            waited, delay = 0.0, 0.1
            while True:
                try:
                    handler(d)
                    return
                except DBAPIError as e:
                    transient = isinstance(e, OperationalError) or e.connection_invalidated
                    if not transient or d.settled or self._stop.is_set():
                        raise
                    if waited >= self.config.db_patience_s:
                        raise
                    log.warning("database unavailable (%s); retrying in %.1f s", e.orig, delay)
                    self._stop.wait(delay)
                    waited += delay
                    delay = min(2 * delay, 2.0)

        return run

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        self._counting.set()
        if self._health is not None:
            self._health.stop()
        for c in self._consumers:
            try:
                c.stop()
            except Exception:
                log.exception("stopping a consumer")
        self._consumers.clear()
        for t in (self._ticker, self._counter):
            if t is not None:
                t.join(timeout=10)
        if not self.config.ingest_only:
            self.leases.stop()  # handed back: the other replicas take the runs at once
        log.info("orchestrator stopped")

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly (un-acked messages are redelivered)."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(1.0):
                if any(not c.alive for c in self._consumers):
                    log.error("a consumer died; stopping")
                    break
        finally:
            self.stop()

    # --- counter ------------------------------------------------------------------------

    def _count_soon(self) -> None:
        """Updates were stored: count them (the counter drains what counting queued)."""
        self._counting.set()

    def _count_loop(self) -> None:
        # Cleared before the inbox is read: an update stored after that sets it again, so
        # none waits for the next tick. The timeout counts what another process stored.
        last_counted = -math.inf
        while not self._stop.is_set():
            self._counting.wait(self.config.tick_s)
            # A pass costs the same few milliseconds of statements whether it counts one
            # update or fifty; under a stream of updates, passes back to back each took the
            # one or two stored meanwhile. After a pass that counted, the next one gathers
            # for ``count_gap_s`` first (an idle counter's first pass starts at once).
            gather = last_counted + self.config.count_gap_s - time.monotonic()
            if gather > 0:
                self._stop.wait(gather)
            self._counting.clear()
            if self._stop.is_set():
                return
            try:
                counted = self.count_waiting()
            except Exception:
                log.exception("counting stored updates failed; retrying")
                counted = 0
            last_counted = time.monotonic() if counted else -math.inf

    def count_waiting(self) -> int:
        """Count the stored updates of the runs this replica holds; returns how many were
        counted or refused."""
        with session_scope(self.sessions) as s:
            run_ids = oq.inbox_run_ids(s)
        owned = self.leases.owned()
        run_ids = [r for r in run_ids if r in owned]
        done = 0
        for run_id in run_ids:
            while True:
                c = self._count(run_id)
                done += c.accepted + c.refused
                if not c.full:
                    break
        if done:
            self._tally("counted", done)
            self._drain_soon()
        return done

    # --- replicas -----------------------------------------------------------------------

    def _gained(self, run_ids: frozenset[str]) -> None:
        """Runs taken over (at start, from a replica that left or died): what waits for them
        is counted and their tasks followed now, not at the next poll; the next tick (within
        ``tick_s``) ticks them."""
        self._count_soon()
        self._kick.set()

    def _tally(self, what: str, n: int) -> None:
        with self._handled_lock:
            self._handled[what] += n

    def _replica_info(self) -> dict[str, Any]:
        with self._handled_lock:
            handled = dict(self._handled)
        return {
            "runs": len(self.leases.owned()),
            "cache_hits": CACHE.hits,
            "cache_misses": CACHE.misses,
            "handled": handled,
        }

    # --- ticker -------------------------------------------------------------------------

    def _drain_soon(self) -> None:
        self._kick.set()

    def _drain(self) -> None:
        try:
            self.outbox.drain()
        except BusError as e:  # the broker is away: one line, the items wait in the table
            log.warning("draining the outbox failed (%s); retrying on the next tick", describe(e))
        except Exception:
            log.exception("draining the outbox failed; retrying on the next tick")

    def broker_away(self) -> bool:
        """True while ticks are held: a consumer is reconnecting to the broker, or they all
        came back less than ``outage_grace_s`` ago (see the module's docstring)."""
        down = [
            h
            for h in self.bus.health()
            if h.name.startswith("consumer") and h.state is LinkState.RECONNECTING
        ]
        now = time.monotonic()
        if down:
            if self._away_since is None:
                self._away_since = now
                self._outages += 1
                log.warning(
                    "the broker is away (%s); deadlines and heartbeat timeouts are held",
                    down[0].last_error,
                )
            self._back_at = None
            return True
        if self._away_since is None:
            return False
        if self._back_at is None:
            self._back_at = now
            log.warning(
                "the broker is back after %.0f s; ticks resume in %.0f s",
                now - self._away_since,
                self.config.outage_grace_s,
            )
        if now - self._back_at < self.config.outage_grace_s:
            return True
        log.warning("ticks resumed")
        self._away_since = self._back_at = None
        return False

    def _tick_loop(self) -> None:
        last_housekeeping = 0.0
        last_prune = 0.0
        last_tick = 0.0
        while not self._stop.is_set():
            # Tasks are followed more often than time ticks: a finished aggregation should
            # not wait half a tick to be noticed (it was most of an embedded round's time).
            wait = min(self.config.follow_s, last_tick + self.config.tick_s - time.monotonic())
            self._kick.wait(max(0.0, wait))
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                away = self.broker_away()
                if away and self._back_at is None:
                    # Nothing can go out, and a drain would wait out the bus's reconnect
                    # attempts on this thread; the consumers say when the broker is back.
                    continue
                if away or time.monotonic() - last_tick < self.config.tick_s:
                    self._drain()
                    with session_scope(self.sessions) as s:
                        waiting = oq.runs_awaiting_tasks(s)
                    owned = self.leases.owned()
                    self.follow([r for r in waiting if r in owned])
                    continue
                last_tick = time.monotonic()
                self.tick()
                if self.clock() - last_housekeeping > 30:
                    last_housekeeping = self.clock()
                    self.housekeeping()
                if time.monotonic() - last_prune > self.config.retention.interval_s:
                    last_prune = time.monotonic()
                    self.prune()
            except Exception:
                log.exception("tick failed")

    def tick(self) -> None:
        """One pass: time passes for every run this replica holds, followed tasks report,
        the outbox drains."""
        self._drain()
        for run_id in self._active_runs():
            self.step(run_id, Tick())
        self.follow()

    def follow(self, run_ids: list[str] | None = None) -> None:
        """Turn finished tasks into machine events, and send what those steps decided."""
        stepped = False
        for run_id in self._active_runs() if run_ids is None else run_ids:
            for event in self._follow(run_id):
                self.step(run_id, event)
                stepped = True
        if stepped:
            self._drain()

    def _active_runs(self) -> list[str]:
        """The runs this replica holds (a run it has not heard of yet: leases look again)."""
        with session_scope(self.sessions) as s:
            runs = oq.active_run_ids(s)
        self.leases.notice(runs)
        owned = self.leases.owned()
        return [r for r in runs if r in owned]

    def step(self, run_id: str, event: Input) -> None:
        """Step ``event`` after counting the run's stored updates (a deadline must not close
        a round past an update that is already in)."""
        self._count(run_id, [StepInput(event)])

    def _count(self, run_id: str, extra: list[StepInput] | None = None) -> Count:
        """One counting pass (``orchestrator.counter``) in its own transaction; its
        metrics are taken once it committed."""
        began = time.perf_counter()
        now = self.clock()
        with session_scope(self.sessions) as s:
            c = count(s, run_id, now, extra=extra or ())
        metrics.observe_count(c.accepted, c.refused, c.accepted_bytes, time.perf_counter() - began)
        metrics.observe_steps(c.steps)
        return c

    def housekeeping(self) -> None:
        """Staged uploads whose chunks stopped coming are dropped (any replica: they belong
        to no run's machine); old update blobs of the runs this replica holds too."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.config.reassembly_timeout_s)
        owned = self.leases.owned()
        with session_scope(self.sessions) as s:
            for blob_id in oq.expire_staged(s, cutoff):
                log.warning("staged upload %s expired", blob_id)
            for run_id in oq.active_run_ids(s):
                if run_id in owned:
                    blobstore.apply_retention(s, run_id, self.config.keep_update_rounds)

    def prune(self) -> None:
        """Retention (orchestrator/retention.py): the events of the runs this replica
        holds; the tables no run owns, unless another replica is pruning them now."""
        self.pruner.prune_runs(sorted(self.leases.owned()))
        self.pruner.prune_shared()

    # --- task follower ------------------------------------------------------------------

    def _follow(self, run_id: str) -> list[Input]:
        with session_scope(self.sessions) as s:
            fed = load(s, run_id)
            if fed is None or fed.round is None:
                return []
            r = fed.round
            if r.state is RoundState.AGGREGATING:
                # A version stored for the round is success, whatever the result backend says.
                row = q.get_round(s, run_id, r.number)
                if row is not None and row.model_version_id is not None:
                    mv = q.get_model_version_by_id(s, row.model_version_id)
                    if mv is not None:
                        stop = (mv.metrics.get("privacy") or {}).get("budget_spent")
                        return [AggregationSucceeded(r.number, mv.version, stop or None)]
        return self._poll(fed)

    def _poll(self, fed: Federation) -> list[Input]:
        r = fed.round
        assert r is not None
        if r.state is RoundState.AGGREGATING:
            tid = aggregate_task_id(fed.run_id, r.number, r.attempt, r.aggregation_retries)
        elif r.state is RoundState.EVALUATING and r.model_version is not None:
            tid = evaluate_task_id(fed.run_id, r.number, r.model_version)
        else:
            return []
        status = self.tasks.poll(tid)
        first = self._task_seen.setdefault(tid, self.clock())
        timed_out = self.clock() - first > self.config.task_timeout_s
        if r.state is RoundState.AGGREGATING:
            if status.state == "success" and status.result:
                stop = status.result.get("budget_spent") or None
                return [AggregationSucceeded(r.number, int(status.result["model_version"]), stop)]
            if status.state == "failure":
                return [AggregationFailed(r.number, status.error or "failed", status.retryable)]
            if timed_out:
                return [AggregationFailed(r.number, f"task {tid} timed out", True)]
            return []
        if status.state == "success":
            return [EvaluationFinished(r.number, _metrics(status.result or {}))]
        if status.state == "failure" or timed_out:
            # An evaluation that cannot run does not undo the round: it finishes without metrics.
            log.warning("evaluation %s: %s", tid, status.error or "timed out")
            return [EvaluationFinished(r.number, {})]
        return []


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if k != "model_version" and isinstance(v, int | float) and not isinstance(v, bool)
    }
