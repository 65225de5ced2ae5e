"""SecAgg+ between the round machine and the wire: stage messages in, stage messages out,
and the unmasking material for the worker.

In: a device's ``secagg_keys`` / ``secagg_shares`` / ``secagg_reveal`` (signals queue,
MAC-checked like a signal) becomes one ``SecAggMessage`` input (``machine_input``).
Out: ``SecAggSend`` effects become outbox publishes on ``fedmq.devices`` (signed when
drained, like every message to devices): the roster and the unmask request once to
``broadcast.<run>`` (the same for everyone), each inbox to its device's own key.
Message ids are fixed per (run, round, attempt, what, device), so a re-drained item is
recognisably the same message. The closing step's ``DispatchAggregate`` carries the
sha256 of the round's material (``secagg.material``: public keys, graph, survivors'
update refs, revealed shares), stored as a blob in the same transaction.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy.orm import Session

from db import blobstore
from db.models import BlobKind
from db.queries import orchestrator as oq
from orchestrator.outbox import publish_item, send_to_device
from orchestrator.state import Federation, SecAggMessage, SecAggSend
from orchestrator.state import secagg as sm
from protocol import topology
from protocol.messages import (
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)

DeviceStageMessage = SecAggKeys | SecAggShares | SecAggReveal
DEVICE_TYPES = (SecAggKeys, SecAggShares, SecAggReveal)


def machine_input(msg: DeviceStageMessage) -> SecAggMessage:
    event: sm.KeysIn | sm.SharesIn | sm.RevealIn
    if isinstance(msg, SecAggKeys):
        k = msg.keys
        event = sm.KeysIn(msg.client_id, sm.Keys(k.c_pub, k.s_pub, k.num_samples))
    elif isinstance(msg, SecAggShares):
        event = sm.SharesIn(msg.client_id, dict(msg.boxes))
    else:
        shares = {o: (s.kind, s.share) for o, s in msg.shares.items()}
        event = sm.RevealIn(msg.client_id, shares)
    return SecAggMessage(msg.client_id, msg.round, msg.attempt, event)


def message_id(run_id: str, number: int, attempt: int, what: str, to: str = "") -> str:
    digest = hashlib.sha256(f"{run_id}\n{number}\n{attempt}\n{what}\n{to}".encode()).hexdigest()
    return f"sa-{what}-{digest[:40]}"


def queue_send(s: Session, fed: Federation, e: SecAggSend) -> None:
    run_id = fed.run_id
    p = e.payload
    if e.what == "inbox":
        (to,) = e.to
        inbox = SecAggInbox(
            run_id=run_id,
            client_id=to,
            round=e.round,
            attempt=e.attempt,
            boxes=dict(p["boxes"]),
            message_id=message_id(run_id, e.round, e.attempt, e.what, to),
        )
        send_to_device(s, run_id, to, inbox.to_json(), inbox.message_id)
        return
    msg: SecAggRoster | SecAggUnmask
    if e.what == "roster":
        msg = SecAggRoster.model_validate(
            {
                **dict(p),
                "run_id": run_id,
                "round": e.round,
                "attempt": e.attempt,
                "message_id": message_id(run_id, e.round, e.attempt, e.what),
            }
        )
    elif e.what == "unmask":
        msg = SecAggUnmask(
            run_id=run_id,
            round=e.round,
            attempt=e.attempt,
            survivors=list(p["survivors"]),
            dropped=list(p["dropped"]),
            message_id=message_id(run_id, e.round, e.attempt, e.what),
        )
    else:
        raise ValueError(f"unknown SecAgg+ message {e.what!r}")
    oq.add_outbox(
        s,
        run_id,
        "publish",
        publish_item(
            exchange=topology.DEVICES_EXCHANGE,
            routing_key=topology.broadcast_routing_key(run_id),
            body=msg.to_json(),
            message_id=msg.message_id,
        ),
    )


def store_material(s: Session, fed: Federation, number: int, attempt: int) -> str | None:
    """The sha256 of the material blob of a secure round that just unmasked; None for any
    other round."""
    rnd = fed.round
    if rnd is None or rnd.secagg is None or (rnd.number, rnd.attempt) != (number, attempt):
        return None
    if rnd.secagg.stage is not sm.Stage.DONE:
        return None
    raw = json.dumps(sm.material(rnd.secagg), sort_keys=True).encode()
    return blobstore.put(s, raw, BlobKind.OTHER)
