"""Carries out what committed transactions decided: publishes and task dispatches.

Every item is idempotent on the receiving side (devices de-duplicate by message id and by
round + attempt; Celery task ids are deterministic and the tasks are idempotent per round),
so draining an item twice after a crash is harmless, and losing one is impossible: it stays
unsent in the table until it went out.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.queries import orchestrator as oq
from orchestrator import metrics
from orchestrator.accounts import AccountError, BrokerAccounts
from orchestrator.keys import SigningKeys
from orchestrator.tasks import TaskRunner
from protocol import chunking, enveloped, signing, topology
from protocol.bus import Bus, BusError, Outgoing
from protocol.codec import peek_header
from protocol.messages import Event, ModelMeta, RoundAnnouncement
from protocol.messages.envelope import new_message_id

log = logging.getLogger(__name__)


def publish_item(
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    """An outbox payload for one plain publish (notices to devices, replies)."""
    return {
        "exchange": exchange,
        "routing_key": routing_key,
        "body": base64.b64encode(body).decode(),
        "headers": headers or {},
        "message_id": message_id,
    }


def send_to_device(s: Session, run_id: str, key: str, body: bytes, message_id: str) -> None:
    """Queue a publish to one device's queue ``device.<key>`` (its client id; before
    registration, the reply key it chose), sent once the transaction commits."""
    oq.add_outbox(
        s,
        run_id,
        "publish",
        publish_item(
            exchange=topology.DEVICES_EXCHANGE,
            routing_key=topology.device_routing_key(key),
            body=body,
            message_id=message_id,
        ),
    )


def revoke_account(s: Session, run_id: str, client_id: str) -> None:
    """Queue the deletion of ``client_id``'s broker user (a no-op without accounts)."""
    oq.add_outbox(s, run_id, "revoke_account", {"client_id": client_id})


def notify_device(s: Session, ev: Event) -> None:
    """Queue a notice ``ev`` to the device ``ev.client_id`` of run ``ev.run_id``."""
    assert ev.client_id is not None and ev.run_id is not None
    send_to_device(s, ev.run_id, ev.client_id, ev.to_json(), ev.message_id)


@dataclass(frozen=True)
class Item:
    id: int
    run_id: str | None
    kind: str
    payload: dict[str, Any]


class Outbox:
    def __init__(
        self,
        bus: Bus,
        sessions: sessionmaker[Session],
        tasks: TaskRunner,
        *,
        chunk_size: int = chunking.DEFAULT_CHUNK_SIZE,
        accounts: BrokerAccounts | None = None,
        keys: SigningKeys | None = None,
    ) -> None:
        self.bus = bus
        self.sessions = sessions
        self.tasks = tasks
        self.chunk_size = chunk_size
        self.accounts = accounts
        # Everything sent to devices is signed when it is sent, not when it is queued: rows
        # queued by an older release go out signed too, and no signature is stored.
        self.keys = keys or SigningKeys(sessions)
        # One drainer per process at a time (and one in all processes: ``drain``).
        self._lock = threading.Lock()

    def drain(self, limit: int = 200) -> int:
        """Send what is pending; returns how many items went out.

        Items are read in one transaction and sent outside any: an eager (embedded) task
        writes to the same SQLite database, which an open write transaction would lock it
        out of. Drainers take turns (``lock_outbox``), so an item goes out twice only when a
        drainer died between sending it and marking it sent; every receiver tolerates that.
        """
        sent = 0
        # One drainer at a time in this process, and (Postgres) in all: the cross-process
        # lock is held in a transaction of its own for the whole drain, and goes with its
        # connection if this process dies.
        with self._lock, session_scope(self.sessions) as held:
            oq.lock_outbox(held)
            while True:
                with session_scope(self.sessions) as s:
                    items = [
                        Item(i.id, i.run_id, i.kind, dict(i.payload))
                        for i in oq.pending_outbox(s, limit)
                    ]
                done: list[int] = []
                try:
                    self._send_page(items, done)
                finally:
                    if done:
                        with session_scope(self.sessions) as s:
                            oq.mark_sent(s, done)
                        sent += len(done)
                if len(items) < limit:
                    return sent

    def _send_page(self, items: list[Item], done: list[int]) -> None:
        """Send ``items``, appending the id of each that went out (or was dropped) to
        ``done``. Plain publishes (events, notices) go together, one broker round trip for
        a run of them, sent before any item that follows them."""
        batch: list[tuple[int, Outgoing]] = []

        def flush() -> None:
            if batch:
                self.bus.publish_many([m for _, m in batch])
                done.extend(i for i, _ in batch)
                batch.clear()

        # Tasks first: a round's aggregation should not queue behind the events of the
        # hundred updates that closed it. Each kind keeps its own order.
        for item in sorted(items, key=lambda i: (i.kind != "task", i.id)):
            try:
                message = self._message(item)
                if message is not None:
                    batch.append((item.id, message))
                    continue
                flush()
                self._send(item)
            except (BusError, AccountError):
                raise  # the broker is away: retried on the next tick
            except Exception:
                # A bad item must not block all after it for ever.
                log.exception("outbox item %s (%s) dropped", item.id, item.kind)
            done.append(item.id)
        flush()

    def _message(self, item: Item) -> Outgoing | None:
        """The plain publish an event or publish item is; None for other kinds."""
        p = item.payload
        if item.kind == "event":
            msg = Event(
                run_id=item.run_id or "none",
                client_id=p.get("client_id"),
                round=p.get("round"),
                kind=p["kind"],
                correlation_id=p.get("correlation_id"),
                detail=_scalars(p.get("detail") or {}),
                # The outbox id makes a re-drained event recognisable as the same one.
                message_id=f"evt-{item.id:012d}",
            )
            return Outgoing(topology.EVENTS_EXCHANGE, "", msg.to_json(), None, msg.message_id)
        if item.kind == "publish":
            body = base64.b64decode(p["body"])
            headers = p.get("headers") or None
            if p["exchange"] == topology.DEVICES_EXCHANGE:
                headers = self._sign_json(item.run_id, p["routing_key"], body, headers)
            return Outgoing(p["exchange"], p["routing_key"], body, headers, p.get("message_id"))
        return None

    def _sign_json(
        self, run_id: str | None, routing_key: str, body: bytes, headers: dict[str, Any] | None
    ) -> dict[str, Any]:
        """``headers`` with the signature of a JSON message to ``routing_key`` on
        ``fedmq.devices`` (``device.<key>``: for that key; ``broadcast.<run>``: the run)."""
        if run_id is None:
            raise ValueError("a message to a device without a run id cannot be signed")
        kind = str(json.loads(body)["type"])
        word, _, key = routing_key.partition(".")
        recipient = signing.BROADCAST if word == "broadcast" else key
        return self.keys.signer().signed_headers(kind, run_id, recipient, body, headers)

    def _send(self, item: Item) -> None:
        """An item that is not a plain publish (those go in ``_send_page``'s batches)."""
        p = item.payload
        if item.kind == "task":
            self.tasks.send(p["name"], list(p["args"]), p["task_id"], p["queue"])
        elif item.kind == "revoke_account":
            if self.accounts is not None:
                self.accounts.revoke(p["client_id"])
        elif item.kind == "broadcast":
            with session_scope(self.sessions) as s:
                self._broadcast(s, item)
        else:
            log.error("unknown outbox item kind %r (id %s); dropping it", item.kind, item.id)

    def _broadcast(self, s: Session, item: Item) -> None:
        """The global model as chunks, then the announcement, both to ``broadcast.<run>``."""
        p = item.payload
        run_id = item.run_id or ""
        run = q.get_run(s, run_id)
        mv = q.get_model_version(s, run_id, int(p["model_version"]))
        if run is None or mv is None:
            log.error("broadcast %s: run %s has no model version %s", item.id, run_id, p)
            return
        blob = blobstore.get(s, mv.blob_sha)
        # "to": an async run's slot, for one device (signed as a broadcast all the same:
        # devices check round and model messages against the broadcast recipient).
        to = p.get("to")
        key = (
            topology.broadcast_routing_key(run_id)
            if to is None
            else topology.device_routing_key(str(to))
        )
        encoding = peek_header(blob).encoding
        meta = ModelMeta(
            run_id=run_id,
            round=int(p["round"]),
            model_version=mv.version,
            blob_sha256=mv.blob_sha,
            blob_bytes=len(blob),
            encoding=encoding,
            message_id=f"model-{run_id}-{mv.version}-{item.id}"[:64],
        )
        envelope = meta.model_dump_json()
        # A fixed blob id per version: a device that already holds it may drop the chunks.
        blob_id = f"model-{run_id}-{mv.version}"[:128]
        signer = self.keys.signer()
        for chunk in chunking.iter_chunks(blob, self.chunk_size, blob_id):
            headers = enveloped.headers(chunk, envelope)
            headers = signer.signed_headers(
                signing.MODEL_KIND, run_id, signing.BROADCAST, chunk.data, headers
            )
            self.bus.publish(
                topology.DEVICES_EXCHANGE,
                key,
                chunk.data,
                headers=headers,
                message_id=new_message_id(),
                mandatory=False,
            )
        metrics.MODEL_BYTES.inc(len(blob))
        train_config = dict((run.config or {}).get("train") or {})
        ann = RoundAnnouncement(
            run_id=run_id,
            round=int(p["round"]),
            model_version=mv.version,
            model_sha256=mv.blob_sha,
            model_bytes=len(blob),
            deadline=datetime.fromtimestamp(float(p["deadline"]), UTC),
            selected=list(p["selected"]),
            attempt=int(p["attempt"]),
            carried=list(p.get("carried") or []),
            train_config=_scalars(train_config),
            message_id=(
                f"round-{run_id}-{p['round']}-{p['attempt']}"
                if to is None
                else f"slot-{run_id}-{p['round']}"
            )[:64],
        )
        body = ann.to_json()
        self.bus.publish(
            topology.DEVICES_EXCHANGE,
            key,
            body,
            headers=signer.signed_headers(ann.type, run_id, signing.BROADCAST, body),
            message_id=ann.message_id,
            mandatory=False,
        )


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    """``Detail`` holds scalars and lists of scalars; anything else travels as its repr."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None or isinstance(v, str | int | float | bool):
            out[str(k)[:64]] = v
        elif isinstance(v, list | tuple) and all(
            x is None or isinstance(x, str | int | float | bool) for x in v
        ):
            out[str(k)[:64]] = list(v)
        else:
            out[str(k)[:64]] = repr(v)
    return out
