"""Async runs: buffered asynchronous aggregation (FedBuff) on the round machine.

A run whose policy says ``mode="async"`` has no rounds that devices wait on. Instead:

- **Slots.** At most ``policy.concurrency`` clients train at once. A free slot goes to a
  selectable client (ready, or finished with its last update) with the newest model
  version: a ``Ticket`` (a number never used before in the run) and a ``Dispatched``
  effect, which the service turns into an announcement to that device alone whose
  ``round`` is the ticket. The device trains and sends its update under that round, as
  in a synchronous run.
- **Buffer.** An update for an outstanding ticket is accepted into ``Buffer.updates``
  (``UpdateBuffered``); any other is refused with the reason (an expired slot keeps its
  reason: too stale, past the deadline, offline). A slot expires when its client goes
  offline, when ``deadline_s`` passes without its update, or when the model moved more
  than ``max_staleness`` versions past its base.
- **Staleness at fold time.** The bound holds when an update is folded too, not only on
  arrival: a buffered update the model moved more than ``max_staleness`` versions past
  while it waited (steps are folded one at a time) is dropped from the buffer with the
  reason (``StaleDropped``), and its client may train again.
- **Version steps are rounds.** Whenever ``buffer_size`` updates are buffered and no step
  is in flight, a round opens already closed (state ``aggregating``) whose received
  updates are the buffer's oldest ``buffer_size``: from there on it is an ordinary round
  (``DispatchAggregate`` → ``AggregationSucceeded`` → ``DispatchEvaluate`` →
  ``EvaluationFinished``), and the aggregate task folds it with staleness weights
  (``workers.tasks.buffered``). Autorun counts version steps.

Counted exactly once: an update enters the buffer only from its client's outstanding
ticket, which it consumes; it leaves the buffer only into one step's ``received``. A
client with an update in the buffer gets no new slot until that update is in a step, so a
step never holds two updates of one client.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.state.effects import (
    DispatchAggregate,
    Dispatched,
    RoundClosed,
    SlotExpired,
    StaleDropped,
    UpdateBuffered,
    VersionStepOpened,
)
from orchestrator.state.inputs import UpdateReceived
from orchestrator.state.model import (
    EXPIRED_KEPT,
    SELECTABLE,
    Buffered,
    Round,
    Ticket,
    Update,
    next_round_number,
)
from orchestrator.state.policy import selection_key
from orchestrator.state.tx import Refused, Tx
from protocol.messages import ClientState, RoundState


def is_async(tx: Tx) -> bool:
    return tx.policy.mode == "async"


def running(tx: Tx) -> bool:
    return not tx.paused and (tx.autorun_remaining or 0) > 0


def on_update(tx: Tx, ev: UpdateReceived) -> None:
    tx.client(ev.client_id)
    buf = tx.buffer
    ticket = buf.ticket_of(ev.client_id)
    if ticket is None or ticket.ticket != ev.round:
        if any(u.client_id == ev.client_id and u.ticket == ev.round for u in buf.updates):
            raise Refused(
                f"duplicate update from {ev.client_id} for ticket {ev.round}; the first is kept",
                ignored=True,
            )
        for cid, number, why in reversed(buf.expired):
            if cid == ev.client_id and number == ev.round:
                raise Refused(f"ticket {ev.round} of {ev.client_id} expired: {why}")
        raise Refused(f"{ev.client_id} holds no outstanding ticket {ev.round}")
    if ev.num_samples < 1 or not ev.ref:
        raise Refused("an update needs a ref and at least one sample")
    staleness = tx.model_version - ticket.base_version
    if staleness > tx.policy.max_staleness:  # expire() frees such slots first; kept as a guard
        raise Refused(
            f"update is {staleness} versions stale, more than max_staleness "
            f"{tx.policy.max_staleness}"
        )
    update = Buffered(ev.client_id, ev.ref, ev.num_samples, ev.round, ticket.base_version)
    tx.buffer = replace(
        buf,
        training=tuple(t for t in buf.training if t.client_id != ev.client_id),
        updates=(*buf.updates, update),
    )
    tx.move(ev.client_id, ClientState.UPDATE, f"update for ticket {ev.round} buffered",
            last_seen=tx.now)  # fmt: skip
    tx.emit(
        UpdateBuffered(
            ev.client_id,
            ev.round,
            ev.ref,
            ev.num_samples,
            ticket.base_version,
            staleness,
            len(tx.buffer.updates),
        )
    )


def advance(tx: Tx) -> None:
    """After any accepted input: give up dead slots, open a step if one is due, hand out
    free slots."""
    expire(tx)
    if running(tx):
        maybe_step(tx)
        fill(tx)


def drop_stale(tx: Tx) -> None:
    """Take out of the buffer the updates the model moved more than ``max_staleness``
    versions past while they waited: the next step's base is at least today's version, so
    they could only be folded staler than the bound. Each is recorded with why."""
    limit = tx.policy.max_staleness
    gone = [u for u in tx.buffer.updates if tx.model_version - u.base_version > limit]
    if not gone:
        return
    tx.buffer = replace(tx.buffer, updates=tuple(u for u in tx.buffer.updates if u not in gone))
    for u in gone:
        stale = tx.model_version - u.base_version
        why = f"{stale} versions stale in the buffer, more than max_staleness {limit}"
        tx.emit(StaleDropped(u.client_id, u.ticket, u.ref, stale, why))
        if tx.clients[u.client_id].state is ClientState.UPDATE:
            tx.move(u.client_id, ClientState.READY, f"update of ticket {u.ticket} dropped: {why}")


def expire(tx: Tx) -> None:
    drop_stale(tx)
    buf = tx.buffer
    if not buf.training:
        return
    keep: list[Ticket] = []
    gone: list[tuple[Ticket, str]] = []
    for t in buf.training:
        rec = tx.clients[t.client_id]
        stale = tx.model_version - t.base_version
        if rec.state is ClientState.OFFLINE:
            gone.append((t, f"{t.client_id} went offline ({rec.offline_reason})"))
        elif tx.now >= t.handed_at + tx.policy.deadline_s:
            gone.append((t, f"no update within deadline_s ({tx.policy.deadline_s:g} s)"))
        elif stale > tx.policy.max_staleness:
            gone.append(
                (t, f"{stale} versions stale, more than max_staleness {tx.policy.max_staleness}")
            )
        else:
            keep.append(t)
    if not gone:
        return
    expired = (*buf.expired, *((t.client_id, t.ticket, why) for t, why in gone))
    tx.buffer = replace(buf, training=tuple(keep), expired=expired[-EXPIRED_KEPT:])
    for t, why in gone:
        tx.emit(SlotExpired(t.client_id, t.ticket, why))
        if tx.clients[t.client_id].state is ClientState.TRAINING:
            tx.move(t.client_id, ClientState.READY, f"ticket {t.ticket} expired: {why}")


def maybe_step(tx: Tx) -> None:
    rnd = tx.round
    size = tx.policy.buffer_size
    if (rnd is not None and rnd.in_flight) or len(tx.buffer.updates) < size:
        return
    take, rest = tx.buffer.updates[:size], tx.buffer.updates[size:]
    number = next_round_number(rnd)
    base = tx.model_version
    updates = tuple(Update(u.client_id, u.ref, u.num_samples) for u in take)
    staleness = tuple(base - u.base_version for u in take)
    tx.round = Round(
        number=number,
        attempt=1,
        state=RoundState.AGGREGATING,
        selected=tuple(sorted(u.client_id for u in take)),
        quorum=len(take),
        opened_at=tx.now,
        deadline=tx.now,
        base_model_version=base,
        received=updates,
    )
    tx.buffer = replace(tx.buffer, updates=rest)
    tx.emit(
        VersionStepOpened(number, base, updates, staleness),
        RoundClosed(number, 1, len(updates), "buffer full"),
        DispatchAggregate(number, 1, updates, base, 0),
    )
    for u in take:
        if tx.clients[u.client_id].state is ClientState.UPDATE:
            tx.move(u.client_id, ClientState.FINISH, f"update in version step {number}")


def fill(tx: Tx) -> None:
    buf = tx.buffer
    cap = tx.policy.concurrency
    free = (len(tx.clients) if cap is None else cap) - len(buf.training)
    if free <= 0:
        return
    busy = {t.client_id for t in buf.training} | buf.buffered_clients()
    eligible = [cid for cid, c in tx.clients.items() if c.state in SELECTABLE and cid not in busy]
    if not eligible:
        return
    # A hash of the run and the next ticket orders them: deterministic, and a different
    # order at each hand-out, so no client is always last.
    run_id, first = tx.base.run_id, buf.next_ticket
    chosen = sorted(eligible, key=lambda c: (selection_key(run_id, first, 1, c), c))[:free]
    tickets = list(buf.training)
    deadline = tx.now + tx.policy.deadline_s
    for i, cid in enumerate(chosen):
        number = first + i
        tickets.append(Ticket(cid, number, tx.model_version, tx.now))
        tx.move(cid, ClientState.TRAINING, f"handed version {tx.model_version} (ticket {number})")
        tx.emit(Dispatched(cid, number, tx.model_version, deadline))
    tx.buffer = replace(buf, training=tuple(sorted(tickets)), next_ticket=first + len(chosen))
