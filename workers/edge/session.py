"""``EdgeSession``: one edge split-training session serving many devices over the bus.

The session consumes its request queue (``protocol.split``) on the bus consumer's thread,
which parses and decodes each request (so decoding overlaps the engine's compute) and
hands it to the serving loop through an in-memory inbox. The loop, on the caller's thread
(the Celery task's), repeats:

1. **gather** a group: the first forward request, then more until every active device has
   one in, ``max_batch_rows`` is reached, or ``wait_bound_s`` has passed since the first
   (dynamic batching with a small wait bound);
2. stage the group's activations, run the body forward on the whole group, and reply to
   each device with its rows;
3. **collect** each member's backward request (forward requests arriving meanwhile wait
   for the next group); a member that does not answer within ``request_timeout_s``, or
   leaves, gets zero gradient rows and is dropped;
4. with ``overlap``, stage the next group's activations before this group's backward
   (their host-to-device copy then runs during it) only when that group is the one
   synchronous serving would form: this group is full (``max_batch_rows``) and forwards
   from every other active device are waiting. Then stage the gradients, run backward
   and the optimizer step, and reply with the input gradients.

A group's forward must wait for the previous group's step (the step changes the weights
the graph was built with), so groups are strictly one after another; devices overlap
among themselves. The body's gradient for a group is the sum of its devices' gradients
(each device's loss is a mean over its own batch). The session ends when
``expected_devices`` have left, after ``idle_timeout_s`` without a request, or after
``max_session_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.bus import Bus, BusError, Delivery, Unroutable
from protocol.codec import CodecError, DecodeLimits
from protocol.messages import MessageError
from protocol.split import (
    DEFAULT_EXCHANGE,
    SplitReply,
    SplitRequest,
    decode_tensor,
    edge_reply_queue,
    edge_request_queue,
    edge_session_topology,
    encode_tensor,
    envelope_headers,
    parse_request,
)
from protocol.topology import exchanges
from workers.edge.engine import EdgeEngine, Staged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeSessionConfig:
    session_id: str
    wait_bound_s: float = 0.002
    max_batch_rows: int = 4096
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    max_session_s: float = 3600.0
    expected_devices: int | None = None
    limits: DecodeLimits = field(default_factory=DecodeLimits)

    def __post_init__(self) -> None:
        if self.wait_bound_s < 0 or self.max_batch_rows < 1:
            raise ValueError("wait_bound_s must be >= 0 and max_batch_rows >= 1")
        if self.expected_devices is not None and self.expected_devices < 1:
            raise ValueError("expected_devices must be >= 1")


@dataclass
class _Request:
    meta: SplitRequest
    array: np.ndarray | None
    error: str | None = None

    @property
    def client(self) -> str:
        return self.meta.client_id


def _rows(r: _Request) -> int:
    return 0 if r.array is None else len(r.array)


@dataclass
class SessionStats:
    requests: int = 0
    groups: int = 0
    rows: int = 0
    devices_seen: int = 0
    devices_dropped: int = 0
    refused: int = 0
    staged_ahead: int = 0  # groups staged before the previous group's backward
    wall_s: float = 0.0  # first request to the last reply
    encode_s: float = 0.0  # replies' codec encoding (host)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# (run id, client id, token) -> None when the client may take part, else the reason.
Authenticate = Callable[[str, str, str | None], str | None]


class EdgeSession:
    def __init__(
        self,
        bus: Bus,
        engine: EdgeEngine,
        config: EdgeSessionConfig,
        *,
        authenticate: Authenticate | None = None,
    ) -> None:
        """``authenticate`` checks every request's client and token (a session serving a
        run's round); without it (a bare session: benchmarks, tests) anyone is served."""
        self.bus, self.engine, self.config = bus, engine, config
        self.authenticate = authenticate
        self._trusted: set[tuple[str, str, str | None]] = set()
        self.stats = SessionStats()
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._pending: deque[_Request] = deque()
        self._active: set[str] = set()
        self._seen: set[str] = set()
        self._left: set[str] = set()
        self._stop = threading.Event()
        self._first: float | None = None
        self._last = 0.0
        self._out_shape: dict[str, tuple[int, ...]] = {}

    def stop(self) -> None:
        """Ask ``serve`` to return after the current group."""
        self._stop.set()

    def serve(self, ready: threading.Event | None = None) -> dict[str, Any]:
        """Serve until the session ends; returns the session's and the engine's figures."""
        self.bus.declare(exchanges())  # fedmq.dead, for rejecting malformed requests
        consumer = self.bus.consume(
            edge_request_queue(self.config.session_id),
            self._on_delivery,
            prefetch=64,
            declare=edge_session_topology(self.config.session_id),
        )
        if ready is not None:
            ready.set()
        began = time.monotonic()
        try:
            self._loop(began)
        finally:
            consumer.stop()
        self.stats.devices_seen = len(self._seen)
        if self._first is not None:
            self.stats.wall_s = self._last - self._first
        engine = self.engine.timings().as_dict()
        busy = engine["compute_s"] / self.stats.wall_s if self.stats.wall_s > 0 else 0.0
        return {**self.stats.as_dict(), "engine": engine, "busy_fraction": busy}

    # --- the consumer's thread ---------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            meta = parse_request(delivery.headers)
        except MessageError as e:
            delivery.reject(f"edge session {self.config.session_id}: {e}")
            return
        request = _Request(meta, None)
        refusal = self._authenticate(meta)
        if refusal is not None:
            # Answered like any refusal (the reply goes to the named client's queue, which
            # only that client may read when devices have broker users of their own).
            request.error = refusal
        elif meta.session_id != self.config.session_id:
            request.error = (
                f"request for session {meta.session_id}, this is {self.config.session_id}"
            )
        elif meta.phase != "leave":
            try:
                request.array = decode_tensor(delivery.body, self.config.limits)
            except CodecError as e:
                request.error = f"bad tensor: {e}"
        delivery.ack()
        self._inbox.put(request)

    def _authenticate(self, meta: SplitRequest) -> str | None:
        if self.authenticate is None:
            return None
        key = (meta.run_id, meta.client_id, meta.token)
        if key in self._trusted:  # one database read per client, not per step
            return None
        reason = self.authenticate(*key)
        if reason is None:
            self._trusted.add(key)
        return reason

    # --- the serving loop --------------------------------------------------------------

    def _loop(self, began: float) -> None:
        cfg = self.config
        next_staged: tuple[list[_Request], Staged] | None = None
        while not self._stop.is_set():
            if next_staged is not None:
                group, staged = next_staged
                next_staged = None
            else:
                end = min(began + cfg.max_session_s, time.monotonic() + cfg.idle_timeout_s)
                first = self._next_forward(end)
                if first is None:
                    return
                group = self._gather(first)
                maybe = self._stage(group)
                if maybe is None:
                    continue
                staged = maybe
            try:
                outputs = self.engine.forward(staged)
            except (RuntimeError, ValueError) as e:
                # A request the body cannot take (wrong shape): fail the group, not the session.
                log.warning("edge session %s: forward failed: %s", self.config.session_id, e)
                for r in group:
                    self._refuse(r, f"the body cannot take this input: {e}"[:1000])
                continue
            self._reply_rows(group, outputs, staged.rows)
            grads = self._collect_backward(group)
            if not grads:
                self.engine.drop_pending()
                continue
            if self.engine.options.overlap and self._worth_staging_ahead(group):
                waiting = self._gather(self._pending.popleft())
                ahead = self._stage(waiting)
                next_staged = None if ahead is None else (waiting, ahead)
                self.stats.staged_ahead += ahead is not None
            staged_grad = self.engine.stage(
                [g.array if g is not None else np.zeros_like(o) for g, o in grads]  # type: ignore[misc]
            )
            grad_in = self.engine.backward(staged_grad)
            self._reply_rows(
                [g for g, _ in grads if g is not None],
                grad_in,
                staged_grad.rows,
                skip=[g is None for g, _ in grads],
            )
            if self._finished():
                return

    def _worth_staging_ahead(self, group: list[_Request]) -> bool:
        """Stage the waiting forwards before this group's backward (their copy then overlaps
        it) only when that changes no group: this group could take none of them
        (``max_batch_rows``) and they come from every active device outside it. Staging
        whatever is waiting would split the devices into alternating smaller groups, and the
        body would step on one device's rows at a time instead of the sum over all of them
        that the synchronous path steps on (a different, timing-dependent training run)."""
        if not self._pending:
            return False
        rows = sum(_rows(r) for r in group)
        if rows + _rows(self._pending[0]) <= self.config.max_batch_rows:
            return False
        members = {r.client for r in group}
        return self._active - members <= {r.client for r in self._pending}

    def _stage(self, group: list[_Request]) -> Staged | None:
        """The group's inputs staged, or None after refusing them all (shapes that do not
        stack: some device sent something else than the head's activations)."""
        try:
            return self.engine.stage([r.array for r in group])  # type: ignore[misc]
        except ValueError as e:
            for r in group:
                self._refuse(r, f"inputs of this group do not stack: {e}"[:1000])
            return None

    def _finished(self) -> bool:
        n = self.config.expected_devices
        return n is not None and len(self._left) >= n and not self._active

    def _take(self, deadline: float) -> _Request | None:
        """The next request from the inbox by ``deadline``, leaves handled here."""
        while True:
            left = deadline - time.monotonic()
            try:
                r = self._inbox.get(timeout=max(0.0, left))
            except queue.Empty:
                return None
            self.stats.requests += 1
            if self._first is None:
                self._first = time.monotonic()
            if r.error is not None:  # before a leave: a refused leave must not count
                self._refuse(r, r.error)
                continue
            if r.meta.phase == "leave":
                self._active.discard(r.client)
                self._left.add(r.client)
                log.info("edge session %s: %s left", self.config.session_id, r.client)
                if self._finished():
                    self._stop.set()
                continue
            self._seen.add(r.client)
            self._active.add(r.client)
            self._left.discard(r.client)
            return r

    def _next_forward(self, deadline: float) -> _Request | None:
        if self._pending:
            return self._pending.popleft()
        while not self._stop.is_set():
            r = self._take(min(deadline, time.monotonic() + 0.1))
            if r is None:
                if time.monotonic() >= deadline:
                    return None
                continue
            if r.meta.phase == "forward":
                return r
            self._refuse(r, "backward without a pending forward")
        return None

    def _gather(self, first: _Request) -> list[_Request]:
        cfg = self.config
        group, members = [first], {first.client}
        rows = len(first.array)  # type: ignore[arg-type]
        deadline = time.monotonic() + cfg.wait_bound_s
        while rows < cfg.max_batch_rows and not self._active <= members:
            if self._pending:
                r: _Request | None = self._pending.popleft()
            else:
                r = self._take(deadline)
            if r is None:
                break
            if r.meta.phase != "forward":
                self._refuse(r, "backward without a pending forward")
            elif r.client in members or rows + len(r.array) > cfg.max_batch_rows:  # type: ignore[arg-type]
                self._pending.appendleft(r)
                break
            else:
                group.append(r)
                members.add(r.client)
                rows += len(r.array)  # type: ignore[arg-type]
        self.stats.groups += 1
        self.stats.rows += rows
        return group

    def _collect_backward(self, group: list[_Request]) -> list[tuple[_Request | None, np.ndarray]]:
        """Each member's backward request (or None: timed out or left), in group order,
        with the member's output rows' shape as a zero template."""
        wanted = {r.client: r for r in group}
        got: dict[str, _Request] = {}
        deadline = time.monotonic() + self.config.request_timeout_s
        while len(got) < len(wanted):
            missing = set(wanted) - set(got)
            if not (missing & self._active):
                break
            r = self._take(deadline)
            if r is None:
                log.warning(
                    "edge session %s: no backward from %s within %g s; dropped",
                    self.config.session_id,
                    sorted(missing),
                    self.config.request_timeout_s,
                )
                break
            if r.meta.phase == "forward":
                self._pending.append(r)
            elif r.client not in wanted or r.client in got:
                self._refuse(r, "backward without a pending forward")
            elif r.meta.step != wanted[r.client].meta.step:
                self._refuse(
                    r, f"backward for step {r.meta.step}, expected {wanted[r.client].meta.step}"
                )
            elif r.array is None or tuple(r.array.shape) != self._out_shape.get(r.client):
                self._refuse(r, "gradient shape does not match the output sent")
            else:
                got[r.client] = r
        dropped = set(wanted) - set(got)
        for client in dropped:
            self._active.discard(client)
        self.stats.devices_dropped += len(dropped)
        if not got:
            return []
        return [(got.get(c), np.zeros(self._out_shape[c], np.float32)) for c in wanted]

    # --- replies -----------------------------------------------------------------------

    def _reply_rows(
        self,
        group: list[_Request],
        result: np.ndarray,
        rows: list[int],
        *,
        skip: list[bool] | None = None,
    ) -> list[_Request]:
        """Send each request its slice of ``result``; returns the requests answered."""
        answered, at = [], 0
        skip = skip or [False] * len(rows)
        requests = iter(group)
        for n, skipped in zip(rows, skip, strict=True):
            part = result[at : at + n]
            at += n
            if skipped:
                continue
            r = next(requests)
            if r.meta.phase == "forward":
                self._out_shape[r.client] = tuple(part.shape)
            t0 = time.perf_counter()
            blob = encode_tensor(part, r.meta.encoding)
            self.stats.encode_s += time.perf_counter() - t0
            if self._send(r, blob):
                answered.append(r)
        self._last = time.monotonic()
        return answered

    def _refuse(self, r: _Request, reason: str) -> None:
        self.stats.refused += 1
        log.warning(
            "edge session %s: refused %s from %s: %s",
            self.config.session_id,
            r.meta.phase,
            r.client,
            reason,
        )
        self._send(r, b"", error=reason)

    def _send(self, r: _Request, body: bytes, error: str | None = None) -> bool:
        reply = SplitReply(
            run_id=r.meta.run_id,
            client_id=r.client,
            session_id=self.config.session_id,
            phase=r.meta.phase,
            step=r.meta.step,
            correlation_id=r.meta.correlation_id,
            error=error,
        )
        try:
            self.bus.publish(
                DEFAULT_EXCHANGE,
                edge_reply_queue(self.config.session_id, r.client),
                body,
                headers=envelope_headers(reply),
                message_id=reply.message_id,
                persistent=False,
            )
            return True
        except Unroutable:
            log.warning(
                "edge session %s: %s is gone (no reply queue)", self.config.session_id, r.client
            )
        except BusError as e:
            log.warning(
                "edge session %s: reply to %s failed: %s", self.config.session_id, r.client, e
            )
        self._active.discard(r.client)
        self._left.add(r.client)
        return False
