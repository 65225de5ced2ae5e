"""Update ingest: chunks staged durably, the whole blob verified and stored, off the run lock.

Each chunk is acknowledged only after it is committed to ``upload_chunks``; the last one only
after the whole update is verified and stored: its blob, its message claim and a row in the
run's update inbox, in one transaction that never takes the run lock, so that any number of
consumers (threads, processes) store updates in parallel. Counting an update (the machine's
step, the device's ``update.accepted``) is the counter's (``orchestrator.counter``), which
takes the inbox under the lock in batches. A crash at any point loses nothing acknowledged
and counts nothing twice: the message id, the inbox's (run, round, client) key and the
(round, client) participation all de-duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import BlobKind, ParticipationState, RoundState
from db.queries import orchestrator as oq
from orchestrator.counter import notify_update, record_refused
from orchestrator.store import record_and_publish
from protocol import auth, chunking, enveloped, topology
from protocol.bus import Delivery
from protocol.codec import CodecError, DecodeLimits, TensorSpec, peek_header, validate
from protocol.messages import UpdateMeta
from protocol.secagg.blob import masked_spec

log = logging.getLogger(__name__)


class Refuse(Exception):
    """Dead-letter the message with this reason."""


@dataclass
class Ingest:
    sessions: sessionmaker[Session]
    limits: DecodeLimits
    after_commit: Callable[[], None]
    clock: Callable[[], float] = time.time
    # How far an update's timestamp may be from this clock (protocol/auth.py). Every chunk
    # carries the envelope, so it must outlast a slow upload: keep it above
    # ``reassembly_timeout_s``.
    auth_window_s: float = auth.DEFAULT_WINDOW_S
    # Called after a commit that queued outbox items (refusals, duplicates' notices): those
    # want a drain. A stored update does not: the counter drains after it counts it, and
    # waking the drainer for every stored batch as well cost a drain per batch.
    # None: ``after_commit`` is all there is.
    after_outbox: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self._specs: dict[tuple[str, int], dict[str, TensorSpec]] = {}
        self._async: dict[str, bool] = {}

    def _is_async(self, s: Session, run_id: str) -> bool:
        """Whether ``run_id`` is an async run (a run's policy never changes: cached)."""
        known = self._async.get(run_id)
        if known is None:
            run = q.get_run(s, run_id)
            policy = (run.config or {}).get("policy") if run is not None else None
            known = isinstance(policy, dict) and policy.get("mode") == "async"
            if run is not None:
                self._async[run_id] = known
        return known

    def handle(self, d: Delivery) -> None:
        try:
            chunk, meta = self._parse(d)
        except Refuse as r:
            self._refuse(d, str(r))
            return
        self._handle_parsed(d, chunk, meta)

    def _handle_parsed(self, d: Delivery, chunk: chunking.Chunk, meta: UpdateMeta) -> None:
        try:
            done = self._stage(d, chunk, meta)
        except Refuse as r:
            self._refuse(d, str(r), meta=meta)  # recorded under its run, client and round
            return
        if not done:
            d.ack()
            return
        self._finish(d, chunk, meta)

    def handle_many(self, ds: list[Delivery]) -> None:
        """A group commit of one-chunk updates: checked, verified and stored (blobs, claims,
        inbox rows) in one transaction without the run lock, then each settled on its own;
        the counter counts them after. A refusal concerns its message alone. A
        chunk of a multi-chunk blob goes the one-at-a-time way (``handle``): its staging
        and reassembly are per blob anyway. If the batch raises, nothing of it committed
        and the caller runs the unsettled messages one at a time."""
        whole: list[tuple[Delivery, chunking.Chunk, UpdateMeta]] = []
        for d in ds:
            try:
                chunk, meta = self._parse(d)
            except Refuse as r:
                self._refuse(d, str(r))
                continue
            if chunk.count == 1:
                whole.append((d, chunk, meta))
            else:
                self._handle_parsed(d, chunk, meta)
        if not whole:
            return
        reasons, queued = self._store_many(whole)
        for (d, _, _), reason in zip(whole, reasons, strict=True):
            d.settle(reason)
        self.after_commit()
        if queued:
            self._outbox_written()

    def _store_many(
        self, items: list[tuple[Delivery, chunking.Chunk, UpdateMeta]]
    ) -> tuple[list[str | None], bool]:
        """Each update's refusal reason (None: acknowledge it), committed together, and
        whether outbox items were queued (refusals, duplicates)."""
        reasons: list[str | None] = [None] * len(items)
        refused: list[tuple[int, bool]] = []  # (index, tell the device)
        # The base models' specs are read first, in their own sessions: inside the batch's
        # transaction another one would wait for its write lock on SQLite.
        no_spec: dict[int, str] = {}
        for i, (_, _, meta) in enumerate(items):
            try:
                self._spec(meta.run_id, meta.base_model_version)
            except Refuse as r:
                no_spec[i] = str(r)
        with session_scope(self.sessions) as s:
            clients = oq.senders(s, (meta.client_id for _, _, meta in items))
            rounds = oq.rounds_by_number(s, ((meta.run_id, meta.round) for _, _, meta in items))
            parts = oq.participation_rows(
                s,
                [
                    (rnd.id, meta.client_id)
                    for _, _, meta in items
                    if (rnd := rounds.get((meta.run_id, meta.round))) is not None
                ],
            )
            ok: list[int] = []
            duplicates = False  # of counted updates: recorded, their devices told again
            for i, (_, chunk, meta) in enumerate(items):
                rnd = rounds.get((meta.run_id, meta.round))
                part = None if rnd is None else parts.get((rnd.id, meta.client_id))
                try:
                    if not self._expected(s, clients.get(meta.client_id), rnd, part, chunk, meta):
                        duplicates = True
                        continue
                except Refuse as r:
                    reasons[i] = str(r)
                    refused.append((i, False))  # as _stage's refusals: recorded only
                    continue
                try:
                    if i in no_spec:
                        raise Refuse(no_spec[i])
                    self._check(chunk.data, meta)
                except Refuse as r:
                    reasons[i] = str(r)
                    refused.append((i, True))
                    continue
                ok.append(i)
            fresh = q.mark_messages_processed(s, (items[i][2].message_id for i in ok))
            ok = [i for i in ok if items[i][2].message_id in fresh]  # others: done before
            # _check verified each blob against its envelope's SHA-256: not hashed again.
            shas, _ = blobstore.put_many(
                s,
                [items[i][1].data for i in ok],
                BlobKind.UPDATE,
                shas=[items[i][2].blob_sha256 for i in ok],
            )
            queued = oq.put_inbox(
                s,
                [
                    _inbox_row(items[i][2], len(items[i][1].data), sha)
                    for i, sha in zip(ok, shas, strict=True)
                ],
            )
            waiting = [
                (i, sha)
                for i, sha in zip(ok, shas, strict=True)
                if items[i][2].message_id not in queued
            ]
            for i, _ in waiting:
                _waiting_duplicate(s, items[i][2])
            blobstore.discard_unreferenced(s, [sha for _, sha in waiting])
            for i, notify in sorted(refused):
                d, _, meta = items[i]
                reason = reasons[i]
                assert reason is not None
                _refused(s, meta, reason, notify=notify, routing_key=d.routing_key)
        return reasons, bool(refused or waiting or duplicates)

    def _parse(self, d: Delivery) -> tuple[chunking.Chunk, UpdateMeta]:
        try:
            chunk, meta = enveloped.read(d.headers, d.body, UpdateMeta, "update")
        except enveloped.EnvelopeError as e:
            raise Refuse(str(e)) from None
        if meta.blob_sha256 != chunk.sha256 or meta.blob_bytes != chunk.size:
            raise Refuse("the envelope's blob_sha256/blob_bytes do not match the chunk's")
        if d.routing_key != topology.update_routing_key(meta.run_id, meta.round, meta.client_id):
            raise Refuse(f"routing key {d.routing_key!r} does not match run and round")
        return chunk, meta

    def _stage(self, d: Delivery, chunk: chunking.Chunk, meta: UpdateMeta) -> bool:
        """Stage the chunk; True when the whole blob is in (then ``_finish`` acks).

        A one-chunk blob is not staged: it is whole already, and its message stays un-acked
        until the update is stored, which is just as durable and writes it once, not twice.
        """
        with session_scope(self.sessions) as s:
            client = oq.senders(s, [meta.client_id]).get(meta.client_id)
            rnd = oq.rounds_by_number(s, [(meta.run_id, meta.round)]).get((meta.run_id, meta.round))
            # One row by its key: listing the round's participations cost O(fleet) an update.
            part = (
                None
                if rnd is None or client is None
                else oq.participation_rows(s, [(rnd.id, meta.client_id)]).get(
                    (rnd.id, meta.client_id)
                )
            )
            if not self._expected(s, client, rnd, part, chunk, meta):
                return False
            if chunk.count == 1:
                return True
            oq.stage_chunk(
                s,
                {
                    "blob_id": chunk.blob_id,
                    "idx": chunk.index,
                    "count": chunk.count,
                    "size": chunk.size,
                    "sha256": chunk.sha256,
                    "client_id": meta.client_id,
                    "run_id": meta.run_id,
                    "round": meta.round,
                    "meta": {"message_id": meta.message_id},
                    "data": chunk.data,
                },
            )
        with session_scope(self.sessions) as s:
            return oq.staged_count(s, chunk.blob_id) >= chunk.count

    def _expected(
        self,
        s: Session,
        client: oq.Sender | None,
        rnd: oq.RoundRow | None,
        part: oq.PartRow | None,
        chunk: chunking.Chunk,
        meta: UpdateMeta,
    ) -> bool:
        """Whether the update is one its round expects (Refuse if it is not); False for a
        duplicate of a counted update, which is recorded and acknowledged, not stored."""
        # Checked before anything is claimed or stored: a refused chunk leaves no trace but
        # its record, so a genuine copy of it is still taken later.
        key = None if client is None or client.run_id != meta.run_id else client.token_hash
        reason = auth.check(
            meta,
            None if key is None else bytes.fromhex(key),
            now=self.clock(),
            window_s=self.auth_window_s,
        )
        if reason is not None:
            raise Refuse(reason)
        if self._is_async(s, meta.run_id):
            # An async update's round is its slot's ticket, not a round row: whether the
            # ticket is outstanding is the machine's to say when it counts it (a refusal
            # there discards the stored blob and tells the device); the message id and
            # the inbox's (run, round, client) key still de-duplicate here.
            return True
        if part is not None and part.state == ParticipationState.UPDATE:
            # A duplicate of a counted update: acked and not stored again, but said once.
            if chunk.index == 0:
                _duplicate(s, meta, part.message_id)
            return False
        if rnd is None or rnd.state != RoundState.OPEN:
            raise Refuse(f"round {meta.round} is not open")
        if part is None or part.state not in (
            ParticipationState.SELECTED,
            ParticipationState.TRAINING,
        ):
            raise Refuse(f"{meta.client_id} is not expected in round {meta.round}")
        return True

    def _finish(self, d: Delivery, chunk: chunking.Chunk, meta: UpdateMeta) -> None:
        if chunk.count == 1:
            blob = chunk.data
        else:
            with session_scope(self.sessions) as s:
                pieces = oq.staged_data(s, chunk.blob_id)
            if len(pieces) < chunk.count:
                # Another consumer took the last two chunks' race and already stored the blob.
                d.ack()
                return
            blob = b"".join(pieces)
            del pieces
        try:
            self._check(blob, meta)
        except Refuse as r:
            with session_scope(self.sessions) as s:
                oq.delete_staged(s, chunk.blob_id)
            self._refuse(d, str(r), notify=True, meta=meta)
            return
        with session_scope(self.sessions) as s:
            queued = False
            if q.mark_message_processed(s, meta.message_id):
                sha = blobstore.put(s, blob, BlobKind.UPDATE)
                if not oq.put_inbox(s, [_inbox_row(meta, len(blob), sha)]):
                    _waiting_duplicate(s, meta)
                    blobstore.discard_unreferenced(s, [sha])
                    queued = True
            oq.delete_staged(s, chunk.blob_id)
        d.ack()
        self.after_commit()
        if queued:
            self._outbox_written()

    def _outbox_written(self) -> None:
        if self.after_outbox is not None:
            self.after_outbox()

    def _check(self, blob: bytes, meta: UpdateMeta) -> None:
        if hashlib.sha256(blob).hexdigest() != meta.blob_sha256 or len(blob) != meta.blob_bytes:
            raise Refuse("the reassembled blob does not match its SHA-256 or size")
        try:
            # What decode refuses (NaN and Inf included), without building the tensors:
            # the blob is only stored here.
            validate(
                blob, limits=self.limits, expected=self._spec(meta.run_id, meta.base_model_version)
            )
        except CodecError as e:
            raise Refuse(f"bad update blob: {e}") from None

    def _spec(self, run_id: str, version: int) -> dict[str, TensorSpec]:
        key = (run_id, version)
        if key not in self._specs:
            with session_scope(self.sessions) as s:
                mv = q.get_model_version(s, run_id, version)
                if mv is None:
                    raise Refuse(f"run {run_id} has no model version {version}")
                spec = dict(peek_header(blobstore.get(s, mv.blob_sha)).tensors)
                run = q.get_run(s, run_id)
                if run is not None and (run.config or {}).get("secagg") is not None:
                    # A secure run's update is the masked vector, and nothing else: a blob
                    # of the model's own tensors (an update in the clear) is refused.
                    spec = masked_spec(spec)
                self._specs[key] = spec
        return self._specs[key]

    def _refuse(
        self, d: Delivery, reason: str, *, notify: bool = False, meta: UpdateMeta | None = None
    ) -> None:
        try:
            with session_scope(self.sessions) as s:
                record_and_publish(
                    s,
                    meta.run_id if meta else None,
                    "update.refused",
                    client_id=meta.client_id if meta else None,
                    round=meta.round if meta else None,
                    detail={"reason": reason, "routing_key": d.routing_key},
                )
                if notify and meta is not None:
                    _notify(s, meta, reason)
        finally:
            d.reject(reason)
        self.after_commit()
        self._outbox_written()


def _refused(s: Session, meta: UpdateMeta, reason: str, *, notify: bool, **detail: str) -> None:
    """Record a refused update under its run, client, round and message (and, with
    ``notify``, tell its device)."""
    record_refused(
        s, meta.run_id, meta.client_id, meta.round, meta.message_id, reason, notify=notify, **detail
    )


def _inbox_row(meta: UpdateMeta, nbytes: int, sha: str) -> dict[str, Any]:
    return {
        "run_id": meta.run_id,
        "round": meta.round,
        "client_id": meta.client_id,
        "message_id": meta.message_id,
        "update_sha": sha,
        "num_samples": meta.num_samples,
        "bytes": nbytes,
        "metrics": dict(meta.metrics),
    }


DUPLICATE = "update.duplicate"


def _duplicate(s: Session, meta: UpdateMeta, counted: str | None) -> None:
    """Record an update for a round that already counted one from this client. The same
    update sent again (a device that resent after a reconnect lost the first notice) is
    told ``update.accepted`` again; a different one is only recorded."""
    same = counted == meta.message_id
    reason = (
        f"round {meta.round} already counted this update"
        if same
        else f"round {meta.round} already counted update {counted} from this client"
    )
    record_and_publish(
        s,
        meta.run_id,
        DUPLICATE,
        client_id=meta.client_id,
        round=meta.round,
        message_id=meta.message_id,
        detail={"reason": reason, "counted": counted},
    )
    if same:
        _notify(s, meta, None)


def _waiting_duplicate(s: Session, meta: UpdateMeta) -> None:
    """Record an update for a round that already holds another one from this client,
    stored and waiting to be counted: acknowledged and recorded, never counted."""
    record_and_publish(
        s,
        meta.run_id,
        DUPLICATE,
        client_id=meta.client_id,
        round=meta.round,
        message_id=meta.message_id,
        detail={"reason": f"round {meta.round} already holds an update from this client"},
    )


def _notify(s: Session, meta: UpdateMeta, reason: str | None) -> None:
    """Tell the device on its own queue whether its update counted (``reason`` None)."""
    notify_update(s, meta.run_id, meta.client_id, meta.round, meta.message_id, reason)
