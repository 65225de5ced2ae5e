"""A device's round bookkeeping, without I/O: which announcement to train next, the updates
still to send, and which sent update awaits its ``update.accepted``.

Announcements are de-duplicated by (round, attempt), as docs/architecture.md asks: a
re-broadcast (an orchestrator restart re-drains its outbox) trains nothing twice, while a
retry attempt that selects the client again (its earlier update did not count) does train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from devices import wire
from devices.store import ModelStore
from devices.wire import SentUpdate
from learning.params import Arrays
from protocol.messages import RoundAnnouncement, UpdateMeta, utcnow


class RoundSkipped(Exception):
    """An announced round this device cannot train (stale, model missing or mismatched)."""


@dataclass(frozen=True)
class Job:
    announcement: RoundAnnouncement
    attempt: int
    weights: Arrays


class RoundTracker:
    def __init__(self, model_wait_s: float = 60.0) -> None:
        self.model_wait_s = model_wait_s
        self.sent: list[SentUpdate] = []
        self.outbox: list[tuple[UpdateMeta, bytes, int]] = []  # (meta, blob, attempt)
        self._seen: set[tuple[int, int]] = set()
        self._pending: tuple[RoundAnnouncement, int, float] | None = None  # (ann, attempt, until)
        self._awaiting: str | None = None  # message id of the sent update not yet accepted
        self._sent_at = 0.0

    def offer(self, ann: RoundAnnouncement, client_id: str) -> bool:
        """Take an announcement; True when it asks this client to train (a new job)."""
        attempt = wire.attempt_for(ann, client_id)
        if attempt is None or (ann.round, attempt) in self._seen:
            return False
        self._seen.add((ann.round, attempt))
        if ann.deadline <= utcnow():
            raise RoundSkipped(f"round {ann.round}: announcement arrived after its deadline")
        self._awaiting = None
        self._pending = (ann, attempt, time.monotonic() + self.model_wait_s)
        return True

    def take(self, models: ModelStore) -> Job | None:
        """The pending job once its model is held; None while there is none or it may still
        arrive. ``RoundSkipped`` when it cannot be trained."""
        if self._pending is None:
            return None
        ann, attempt, until = self._pending
        weights = models.get(ann.model_version)
        if weights is None:
            if time.monotonic() > until or ann.deadline <= utcnow():
                self._pending = None
                raise RoundSkipped(f"round {ann.round}: model {ann.model_version} never arrived")
            return None  # its chunks may still be on the way
        self._pending = None
        if models.sha256.get(ann.model_version) != ann.model_sha256:
            raise RoundSkipped(f"round {ann.round}: model {ann.model_version} sha256 differs")
        return Job(ann, attempt, weights)

    def queue(self, meta: UpdateMeta, blob: bytes, attempt: int) -> None:
        self.outbox.append((meta, blob, attempt))

    def mark_sent(self) -> SentUpdate:
        """The first queued update went out completely."""
        meta, _, attempt = self.outbox.pop(0)
        sent = SentUpdate(
            round=int(meta.round or 0),
            attempt=attempt,
            base_version=meta.base_model_version,
            message_id=meta.message_id,
            blob_sha256=meta.blob_sha256,
            blob_bytes=meta.blob_bytes,
            num_samples=meta.num_samples,
            metrics={k: float(v) for k, v in meta.metrics.items() if isinstance(v, float)},
        )
        self._awaiting, self._sent_at = meta.message_id, time.monotonic()
        self.sent.append(sent)
        return sent

    def settled(self, wait_s: float) -> bool:
        """Nothing left to send, and the latest update was answered (accepted or rejected) or
        has waited ``wait_s`` for it: a device may leave without racing its own update."""
        if self.outbox:
            return False
        return self._awaiting is None or time.monotonic() - self._sent_at > wait_s

    def rejected(self, correlation_id: str | None) -> None:
        if correlation_id is not None and correlation_id == self._awaiting:
            self._awaiting = None

    def accepted(self, correlation_id: str | None) -> bool:
        """An ``update.accepted`` notice: True when it is for the latest update sent and no
        newer round has selected this client since (the orchestrator still has it in
        ``update``, where ``finish`` is a legal signal)."""
        if correlation_id is None or correlation_id != self._awaiting:
            return False
        self._awaiting = None
        return self._pending is None
