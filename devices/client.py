"""``FederatedClient``: a device on the Bus, following docs/architecture.md "Wire conventions
(devices)" (reference: tests/integration/lightclient.py). It reaches the federation through
a ``Transport`` (devices/transport.py): the bus itself, or HTTP through the REST gateway.

Register (reply-key dance) → declare ``device.<client_id>`` → signal ``ready`` → loop:
heartbeat every ``heartbeat_s``, pull the device queue (model chunks, round announcements,
``update.accepted``/``update.rejected`` notices). Selected (and not carried) in a round it
has not trained yet (by (round, attempt)): train from the announced version and send the
update chunks. ``leave`` signals ``offline`` and deletes the queue.

Signals and the orchestrator's ``SIGNAL_RULES``: ``ready`` (from join), ``offline`` (from any
live state) and ``join`` (after offline) are always legal when sent. ``training``,
``update`` and ``finish`` are only signs of life there (the orchestrator moves a selected
client through those states itself), and they race with its own moves: signals and updates
travel on different queues with different consumers, so e.g. an ``update`` signal can be
processed after the round already closed (client in ``finish``: refused and dead-lettered).
So they are sent only with ``WireConfig.progress_signals`` (``training`` on selection,
``update`` just before the chunks, ``finish`` on ``update.accepted``); heartbeats keep the
client alive either way.

Local training runs on a thread of its own, so that the loop keeps heartbeating and reading
its queue however long a round's training takes (the orchestrator writes off a device that
is silent past its heartbeat timeout); the finished update is sent from the loop.

Simulated heterogeneity (``DeviceConfig.simulated``: ``slowdown_s`` / ``dropout``): a slow
device's training takes ``slowdown_s`` longer; a device that drops out of a round trains
nothing and goes silent (no heartbeats, no reads) for ``outage_s`` (at most until the
round's deadline), then rejoins like a device whose network came back. The dice are seeded
by (seed, device, round, attempt).

Everything read from the device queue is verified first (protocol/signing.py): signed by
the orchestrator key pinned at registration (``Identity.signing_key``, kept in the identity
file), for this run and this device (or the whole run, for chunks and announcements).
What is not is dropped with its reason before it can count: a forged announcement never
marks its round as seen.

Every bus call of one client happens on its loop's thread. A ``BusError`` escaping the bus's
own reconnects (or a bus call stalled past ``rejoin_after_stall_s``) makes the loop back off,
re-declare its queue, signal ``join`` (a rejoin if it was marked offline meanwhile; a
duplicate otherwise) and ``ready``, and resend an update whose publish failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from devices import wire
from devices.config import DeviceConfig
from devices.identity import forget_identity, load_identity, save_identity
from devices.local import LocalTrainer
from devices.rounds import Job, RoundSkipped, RoundTracker
from devices.secure_round import SecureRounds, is_secure
from devices.store import ModelError, ModelStore
from devices.training import SharedCompute, TrainingSlot
from devices.transport import BusTransport, Inbound, Transport, TrustError
from devices.wire import Identity, SentUpdate
from protocol import auth, chunking, signing
from protocol.bus import Bus, BusError
from protocol.messages import (
    ClientState,
    Event,
    MessageError,
    RoundAnnouncement,
    SecAggInbox,
    SecAggRoster,
    SecAggUnmask,
    parse_message,
    utcnow,
)
from protocol.secagg import SecAggError
from protocol.signing import SignatureError, Verifier

log = logging.getLogger(__name__)

RoundCallback = Callable[[SentUpdate], None]


class FederatedClient:
    def __init__(
        self,
        config: DeviceConfig,
        link: Bus | Transport,
        *,
        trainer: LocalTrainer | None = None,
        on_round: RoundCallback | None = None,
        compute: SharedCompute | None = None,
    ) -> None:
        self.config, self.on_round = config, on_round
        # A bare Bus is the AMQP (or in-process) device; HttpTransport goes through the gateway.
        self.transport = link if isinstance(link, Transport) else BusTransport(link)
        if trainer is None and config.training.runtime == "wasm":
            from devices.wasm_trainer import WasmTrainer  # wasmtime only where it is used

            trainer = WasmTrainer.from_config(config)
        if trainer is None and config.training.flower_client is not None:
            from devices.flower import FlowerTrainer  # flwr only where it is used

            trainer = FlowerTrainer.from_config(config)
        self.trainer = trainer or LocalTrainer.from_config(config)
        self.models = ModelStore(
            expected=self.trainer.spec,
            limits=config.wire.decode_limits,
            keep=config.wire.keep_models,
        )
        self.ident: Identity | None = None  # run id, client id and token once registered
        # The orchestrator's key: given beforehand, or pinned at registration and kept in
        # the identity file. Never replaced by a later registration's (``wire.register``).
        self.pinned_key: str | None = config.wire.orchestrator_key
        self._verifier: Verifier | None = None
        self.dropped: list[str] = []  # why messages were dropped unverified (tests, people)
        self.resumed = False  # went on as a kept identity (config.wire.identity_file)
        self.rounds = RoundTracker(config.wire.model_wait_s)
        self.notices: list[Event] = []
        self.announcements: list[RoundAnnouncement] = []
        self.signals_sent: list[ClientState] = []
        self.heartbeats_sent = 0
        self.errors: list[str] = []
        self.dropped_rounds: list[int] = []
        self.left = False
        self._silent_until = 0.0
        # ``compute``: training slots shared with the process's other devices (TrainingSlot).
        self.training = TrainingSlot(self.trainer, config, self._stopping, compute)
        # Secure rounds (devices/secure_round.py), and the simulated SecAgg+ dropouts of
        # tests and benchmarks: round -> the stage ("keys", "shares", "masked") after which
        # this device vanishes (stops without a word, as a device whose link died).
        self.secure = SecureRounds(config.run_id, self.trainer, config.training.defaults, compute)
        self.vanish: dict[int, str] = {}
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._done = threading.Event()
        self._external: threading.Event | None = None
        self._leave_on_stop = True
        self._last_beat = 0.0
        self._recover = False
        self._say_ready = True  # "ready" goes out from the loop, where bus errors are handled
        self._thread: threading.Thread | None = None

    # --- state for callers and tests ------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        return self.ident.client_id if self.ident is not None else None

    @property
    def token(self) -> str | None:
        return self.ident.token if self.ident is not None else None

    @property
    def sent(self) -> list[SentUpdate]:
        return self.rounds.sent

    @property
    def rounds_trained(self) -> list[int]:
        return [u.round for u in self.sent]

    @property
    def last_metrics(self) -> dict[str, float] | None:
        return dict(self.sent[-1].metrics) if self.sent else None

    @property
    def accepted(self) -> list[str]:
        return [n.correlation_id or "" for n in self.notices if n.kind == "update.accepted"]

    @property
    def rejected(self) -> list[Event]:
        return [n for n in self.notices if n.kind == "update.rejected"]

    # --- control ----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> FederatedClient:
        """Run the loop on a thread of its own; returns once registered."""
        self._thread = threading.Thread(target=self.run, name=f"device-{self.config.name}")
        self._thread.daemon = True
        self._thread.start()
        waited = time.monotonic() + timeout
        while not self._registered.wait(0.05):
            if self._done.is_set() or time.monotonic() > waited:
                raise TimeoutError(f"{self.config.name} did not register: {self.errors[-3:]}")
        return self

    def stop(self, leave: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop; with ``leave`` it signals ``offline`` and deletes its queue first."""
        self._leave_on_stop = leave
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def leave(self, timeout: float = 30.0) -> None:
        self.stop(leave=True, timeout=timeout)

    def wait_rounds(self, n: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.sent) < n and time.monotonic() < deadline and not self._done.is_set():
            time.sleep(0.02)
        return len(self.sent) >= n

    def run(self, stop_event: threading.Event | None = None) -> None:
        """The device's loop on the calling thread, until stopped (or ``stop_after_rounds``)."""
        self._external = stop_event
        try:
            if self.config.training.warm_up:
                log.info("%s: warmed up in %.2f s", self.config.name, self.trainer.warm_up())
            if self._register():
                self._loop()
        finally:
            try:
                if self._leave_on_stop and self.ident is not None and not self.left:
                    self._leave()
            finally:
                self.training.shutdown()
                self.secure.shutdown()
                self._done.set()

    def _stopping(self) -> bool:
        limit = self.config.stop_after_rounds
        return (
            self._stop.is_set()
            or (self._external is not None and self._external.is_set())
            or (
                limit is not None
                and len(self.sent) >= limit
                and self.rounds.settled(self.config.wire.answer_wait_s)
                and not self.secure.owes_shares()
            )
        )

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping() and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def _error(self, what: str) -> None:
        log.warning("%s: %s", self.config.name, what)
        self.errors.append(what)

    # --- registration -------------------------------------------------------------------------

    def _register(self) -> bool:
        if self._resume():
            return True
        attempt = 0
        while not self._stopping():
            try:
                ident = self.transport.register(
                    self.config.run_id,
                    self.config.name,
                    device_info=self.config.wire.device_info,
                    timeout_s=self.config.wire.register_timeout_s,
                    poll_s=self.config.wire.poll_s,
                    stopping=self._stopping,
                    expected_key=self.pinned_key,
                )
            except TrustError as e:
                self._error(f"register: {e}; stopping")
                return False
            except (BusError, TimeoutError) as e:
                self._error(f"register: {e}")
                # A refusal says how long to wait (a rate, the run's cap): no sooner.
                retry_after = getattr(e, "retry_after_s", None) or 0.0
            else:
                if ident is not None:
                    # Kept before ``start`` returns: the pinned key is on disk from then on.
                    if self.config.wire.identity_file is not None:
                        save_identity(self.config.wire.identity_file, ident)
                    self._registered_as(ident)
                return ident is not None
            attempt += 1
            self._wait(max(self.transport.backoff(attempt), retry_after))
        return False

    def _resume(self) -> bool:
        """Go on as the client a kept identity names: the loop then rejoins (join + ready),
        which the orchestrator takes from a client it wrote off or saw leave."""
        path = self.config.wire.identity_file
        kept = None if path is None else load_identity(path, self.config.run_id)
        if path is None or kept is None:
            return False
        if self.pinned_key is not None and kept.signing_key not in (None, self.pinned_key):
            self._error(
                f"the identity file {path} pins orchestrator key {kept.signing_key}, not the "
                f"configured {self.pinned_key}; not resuming"
            )
            return False
        if kept.signing_key is None and self.pinned_key is None:
            # Written before messages were signed: nothing to check them against.
            self._error(f"the identity file {path} pins no orchestrator key; registering anew")
            forget_identity(path)
            return False
        try:
            self.transport.resume(kept)
        except BusError as e:
            self._error(f"cannot resume as {kept.client_id} ({e}); registering anew")
            forget_identity(path)
            return False
        log.info("%s: resumed as client %s", self.config.name, kept.client_id)
        self._registered_as(kept)
        self.resumed = True
        self._recover, self._say_ready = True, False
        return True

    def _registered_as(self, ident: Identity) -> None:
        key = ident.signing_key or self.pinned_key
        assert key is not None, "a registration always pins a key (protocol.registration)"
        self.pinned_key, self._verifier = key, Verifier(key)
        self.ident = ident
        self.trainer.bind_identity(ident.client_id, ident.token)
        self._registered.set()

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while not self._stopping():
            if self._silent_until:
                self._wait(self._silent_until - time.monotonic())
                self._silent_until, self._recover = 0.0, True
                continue
            try:
                if self._recover:
                    self._rejoin()
                if self._say_ready:
                    self._signal(ClientState.READY)
                    self._say_ready = False
                self._tick()
                failures = 0
            except BusError as e:
                if self.transport.fatal(e):  # our own link was closed under us: no retry
                    self._error(f"bus closed: {e}")
                    return
                failures += 1
                self._error(f"bus: {e}; retrying ({failures})")
                self._recover = True
                self._wait(self.transport.backoff(failures))

    def _rejoin(self) -> None:
        assert self.ident is not None
        self.transport.attach(self.ident)
        self._signal(ClientState.JOIN)  # rejoins if marked offline meanwhile; else a duplicate
        self._signal(ClientState.READY)
        self._recover = self._say_ready = False
        self._flush()

    def _tick(self) -> None:
        assert self.ident is not None
        if time.monotonic() - self._last_beat >= self.config.wire.heartbeat_s:
            self._heartbeat()
        self._flush()
        self._maybe_train()
        self._secure_collect()
        # No longer than until the next heartbeat is due: a device that polls no more often
        # than it must (a long poll_s) still beats on time.
        due = self._last_beat + self.config.wire.heartbeat_s - time.monotonic()
        wait = max(0.0, min(self.config.wire.poll_s, due))
        if self.training.busy:
            # The update goes out as soon as training ends, not at the next poll timeout
            # (that wait was most of a small model's round); the queue is read without
            # waiting meanwhile, so notices and announcements still come in every pass.
            if self.training.wait(wait):
                self._collect()
            wait = 0.0
        elif self.secure.busy:
            if self.secure.wait(wait):  # the masked input goes out as soon as it is made
                self._secure_collect()
            wait = 0.0
        began = time.monotonic()
        d = self.transport.receive(self.ident, wait)
        if time.monotonic() - began > self.config.wire.rejoin_after_stall_s:
            self._recover = True  # the bus reconnected on its own; we may be offline by now
        if d is not None:
            self._handle(d)

    def _handle(self, d: Inbound) -> None:
        # Verified before anything acts on it: a forged announcement must not even mark
        # its round as seen (that would make the device skip the real one).
        try:
            if chunking.is_chunk(d.headers):
                self._verify(signing.MODEL_KIND, d)
                self.models.add_chunk(d.headers, d.body)
                d.ack()
                return
            msg = parse_message(d.body)
            self._verify(msg.type, d)
        except SignatureError as e:
            self.dropped.append(str(e))
            self._drop(d, f"dropped: {e}")
            return
        except (ModelError, MessageError) as e:
            self._drop(d, str(e))
            return
        d.ack()
        if isinstance(msg, Event):
            self._on_notice(msg)
        elif isinstance(msg, RoundAnnouncement):
            self._on_announcement(msg)
        elif isinstance(msg, SecAggRoster | SecAggInbox | SecAggUnmask):
            self._on_stage(msg)

    def _verify(self, kind: str, d: Inbound) -> None:
        """Raises ``SignatureError`` unless ``d`` is signed by the pinned orchestrator key
        for this run and this device (or the whole run, for what is broadcast). What a
        transport made itself from a trusted answer (``local``) needs no signature."""
        if getattr(d, "local", False):
            return
        assert self.ident is not None
        if self._verifier is None:
            raise SignatureError("no orchestrator key pinned")
        recipient = signing.recipient_for(kind, self.ident.client_id)
        self._verifier.verify(kind, self.ident.run_id, recipient, d.body, d.headers)

    def _drop(self, d: Inbound, reason: str) -> None:
        self._error(reason)
        try:
            d.reject(reason)
        except BusError:
            d.ack()

    def _on_notice(self, ev: Event) -> None:
        self.notices.append(ev)
        if ev.kind == "client.rejoin":  # written off while we were away: join again
            if not self._recover:
                self._error(f"the orchestrator wrote us off: {ev.detail.get('reason')}")
            self._recover = True
        elif ev.kind == "update.rejected":
            self.rounds.rejected(ev.correlation_id)
            self._error(f"update {ev.correlation_id} rejected: {ev.detail.get('reason')}")
        elif ev.kind == "update.accepted" and self.rounds.accepted(ev.correlation_id):
            self._progress(ClientState.FINISH)

    def _on_announcement(self, ann: RoundAnnouncement) -> None:
        if ann.run_id != self.config.run_id:
            return
        self.announcements.append(ann)
        assert self.ident is not None
        try:
            if self.rounds.offer(ann, self.ident.client_id):
                self._maybe_train()
        except RoundSkipped as e:
            self._error(str(e))

    def _maybe_train(self) -> None:
        if self.training.busy:
            self._collect()
            return
        try:
            job = self.rounds.take(self.models)
        except RoundSkipped as e:
            self._error(str(e))
            return
        if job is None:
            return
        ann = job.announcement
        if self.trainer.num_samples < 1:
            self._error(f"round {ann.round}: no local training data")
            return
        if is_secure(ann.train_config):
            self._secure_start(job)
            return
        if self.training.drops_out(ann.round, job.attempt):
            self.dropped_rounds.append(ann.round)
            log.info("%s: drops out of round %s (simulated)", self.config.name, ann.round)
            left = (ann.deadline - utcnow()).total_seconds()
            self._silent_until = time.monotonic() + max(
                0.0, min(left, self.config.simulated.outage_s)
            )
            return
        self._progress(ClientState.TRAINING)
        self.training.start(job)

    # --- secure rounds -----------------------------------------------------------------------

    def _secure_start(self, job: Job) -> None:
        assert self.ident is not None
        keys = self.secure.start(job, self.ident.client_id)
        self.transport.send_stage(self.ident, keys)
        self._vanish_after(keys.round, "keys")

    def _on_stage(self, msg: SecAggRoster | SecAggInbox | SecAggUnmask) -> None:
        assert self.ident is not None
        if msg.run_id != self.config.run_id:
            return
        try:
            if isinstance(msg, SecAggRoster):
                shares = self.secure.on_roster(msg)
                if shares is not None:
                    self.transport.send_stage(self.ident, shares)
                    self._vanish_after(msg.round, "shares")
            elif isinstance(msg, SecAggInbox):
                self.secure.on_inbox(msg)  # trains on its thread; _secure_collect sends
            else:
                reveal = self.secure.on_unmask(msg)
                if reveal is not None:
                    self.transport.send_stage(self.ident, reveal)
        except SecAggError as e:
            self._error(f"round {msg.round}: secure aggregation: {e}")

    def _secure_collect(self) -> None:
        """Send the masked input of a finished secure training (from the loop's thread)."""
        assert self.ident is not None
        try:
            done = self.secure.collect()
        except Exception as e:  # a device must not die of one round
            self._error(f"secure round: training or masking failed: {e!r}")
            return
        if done is None:
            return
        cur, meta, blob = done
        self.rounds.queue(auth.sign(meta, self.ident.token), blob, cur.job.attempt)
        self._flush()
        self._vanish_after(meta.round, "masked")

    def _vanish_after(self, round_number: int | None, stage: str) -> None:
        if round_number is not None and self.vanish.get(round_number) == stage:
            log.info("%s: vanishes after %s in round %s (simulated)", self.config.name,
                     stage, round_number)  # fmt: skip
            self._leave_on_stop = False
            self._stop.set()

    def _collect(self) -> None:
        """Send the update of a finished training (from the loop's thread)."""
        done = self.training.collect()
        if done is None:
            return
        job, upd = done
        if isinstance(upd, Exception):
            self._error(f"round {job.announcement.round}: training failed: {upd!r}")
            return
        assert self.ident is not None
        self._progress(ClientState.UPDATE)  # before the chunks, to narrow the race
        self.rounds.queue(wire.update_meta(self.ident, upd), upd.blob, job.attempt)
        self._flush()

    def _flush(self) -> None:
        """Send the updates not yet sent (normally just the one trained now); one whose
        publish failed is sent again, whole, after the loop recovered."""
        while self.rounds.outbox:
            meta, blob, _ = self.rounds.outbox[0]
            self.transport.send_update(meta, blob, self.config.wire.chunk_size)
            sent = self.rounds.mark_sent()
            if self.on_round is not None:
                try:
                    self.on_round(sent)
                except Exception as e:  # the caller's bug must not stop the device
                    self._error(f"on_round callback failed: {e!r}")

    # --- signals -----------------------------------------------------------------------------

    def _signal(self, state: ClientState) -> None:
        assert self.ident is not None
        self.transport.signal(self.ident, state)
        self.signals_sent.append(state)

    def _progress(self, state: ClientState) -> None:
        """training/update/finish: only with ``progress_signals`` (see the module doc)."""
        if self.config.wire.progress_signals:
            self._signal(state)

    def _heartbeat(self) -> None:
        assert self.ident is not None
        self.transport.heartbeat(self.ident)
        self.heartbeats_sent += 1
        self._last_beat = time.monotonic()

    def _leave(self) -> None:
        assert self.ident is not None
        try:
            self.transport.leave(self.ident)
            self.signals_sent.append(ClientState.OFFLINE)
            self.left = True
        except BusError as e:
            self._error(f"leave: {e}")
