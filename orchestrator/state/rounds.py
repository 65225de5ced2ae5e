"""The round's life: open (or retry), close, fail; all of it on a ``Tx``."""

from __future__ import annotations

from orchestrator.state import secure
from orchestrator.state.effects import (
    AutorunChanged,
    DispatchAggregate,
    DispatchEdgeSession,
    OpenedRound,
    RoundClosed,
    RoundFailed,
    RoundRetried,
)
from orchestrator.state.model import SELECTABLE, Round, next_round_number
from orchestrator.state.policy import select_clients
from orchestrator.state.tx import Tx
from protocol.messages import ClientState, RoundState


def open_next(tx: Tx) -> str | None:
    """Open the pending retry, else the next round. Returns why it cannot, or None if opened.

    A retry keeps the updates its earlier attempts received (they were trained on the same
    global model, so they are still good) and selects fresh clients besides; it needs at least
    one, since a retry that could learn nothing new would only close on what failed before.
    """
    rnd = tx.round
    if rnd is not None and rnd.retry_pending:
        number, attempt, carried = rnd.number, rnd.attempt + 1, rnd.received
    else:
        number, attempt, carried = next_round_number(rnd), 1, ()
    if tx.base.secagg is not None:
        carried = ()  # masks are per attempt: an earlier attempt's input cannot be unmasked
    carried_ids = {u.client_id for u in carried}
    eligible = [
        cid
        for cid, c in tx.clients.items()
        if c.state in SELECTABLE and c.eligible_from <= number and cid not in carried_ids
    ]
    available = len(eligible) + len(carried)
    if available < tx.policy.min_clients:
        return f"round {number} needs {tx.policy.min_clients} ready clients, {available} are"
    if not eligible:
        return f"attempt {attempt} of round {number} needs a ready client that has not reported"

    weights = None
    if tx.policy.selection == "availability":
        weights = {cid: tx.clients[cid].availability for cid in eligible}
    fresh = select_clients(
        tx.base.run_id, number, attempt, eligible, len(carried), tx.policy, weights
    )
    selected = tuple(sorted(carried_ids.union(fresh)))
    offline = ClientState.OFFLINE
    deadline = secure.attempt_deadline(tx) or tx.now + tx.policy.deadline_s
    tx.round = Round(
        number=number,
        attempt=attempt,
        state=RoundState.OPEN,
        selected=selected,
        quorum=tx.policy.quorum_for(len(selected)),
        opened_at=tx.now,
        deadline=deadline,
        base_model_version=tx.model_version,
        received=carried,
        dropped=tuple(sorted(c for c in carried_ids if tx.clients[c].state is offline)),
        secagg=secure.start(tx, number, attempt, selected),
    )
    if attempt > 1:
        tx.emit(RoundRetried(number, attempt))
    if tx.base.split:
        # Before the announcement: the session's queue should be up when devices first ask.
        tx.emit(DispatchEdgeSession(number, attempt, tuple(sorted(fresh)), tx.round.deadline))
    tx.emit(
        OpenedRound(
            number=number,
            attempt=attempt,
            selected=selected,
            carried=tuple(sorted(carried_ids)),
            quorum=tx.round.quorum,
            deadline=tx.round.deadline,
            model_version=tx.model_version,
        )
    )
    for cid in fresh:
        tx.move(cid, ClientState.TRAINING, f"selected for round {number}")
    return None


def try_open(tx: Tx) -> None:
    """Open what is due: a pending retry, or the next autorun round; quietly wait otherwise."""
    rnd = tx.round
    if tx.paused or (rnd is not None and rnd.in_flight):
        return
    if (rnd is not None and rnd.retry_pending) or (tx.autorun_remaining or 0) > 0:
        open_next(tx)


def close(tx: Tx, reason: str) -> None:
    """Open → aggregating, with exactly the received updates."""
    rnd = tx.round
    assert rnd is not None and rnd.state is RoundState.OPEN and rnd.has_quorum
    tx.set_round(state=RoundState.AGGREGATING)
    tx.emit(
        RoundClosed(rnd.number, rnd.attempt, len(rnd.received), reason),
        DispatchAggregate(rnd.number, rnd.attempt, tuple(rnd.received), rnd.base_model_version, 0),
    )
    for cid in rnd.expected:
        tx.move(cid, ClientState.READY, f"round {rnd.number} closed without its update")
    _finish_reporters(tx, rnd, f"round {rnd.number} closed")


def fail_attempt(tx: Tx, reason: str) -> None:
    """An open attempt ends below quorum: retry by policy, else the round fails for good."""
    rnd = tx.round
    assert rnd is not None and rnd.state is RoundState.OPEN
    retry = rnd.attempt < tx.policy.max_attempts
    tx.set_round(state=RoundState.FAILED, retry_pending=retry, failure=reason)
    tx.emit(RoundFailed(rnd.number, rnd.attempt, reason, final=not retry))
    for cid in rnd.expected:
        tx.move(cid, ClientState.READY, f"round {rnd.number} attempt {rnd.attempt} failed")
    if rnd.secagg is not None and retry:
        # A masked input is not carried into a retry (masks are per attempt): its device
        # may be selected again, and must be ready for it.
        for u in rnd.received:
            if tx.clients[u.client_id].state is ClientState.UPDATE:
                tx.move(u.client_id, ClientState.READY, "its masked input dies with the attempt")
    if not retry:
        fail_for_good(tx)


def fail_for_good(tx: Tx) -> None:
    """After a final failure no round opens by itself: autorun stops and the operator decides.

    The run is not marked failed; an ``OpenRound`` or ``Autorun`` starts the next round number.
    """
    rnd = tx.round
    assert rnd is not None and rnd.state is RoundState.FAILED
    _finish_reporters(tx, rnd, f"round {rnd.number} failed")
    tx.set_round(retry_pending=False)
    if tx.autorun_remaining:
        tx.autorun_remaining = None
        tx.emit(AutorunChanged(None, f"round {rnd.number} failed"))


def check_complete(tx: Tx) -> None:
    """Nobody left to wait for (all reported, or the rest dropped out): end the attempt now."""
    rnd = tx.round
    if rnd is not None and rnd.secagg is not None:
        secure.sync(tx)  # a secure round ends when its stages do
        return
    if rnd is None or rnd.state is not RoundState.OPEN or rnd.anyone_expected:
        return
    if rnd.has_quorum:
        close(tx, "no selected client left to wait for")
    else:
        fail_attempt(tx, f"{len(rnd.received)} of {rnd.quorum} updates and no selected client left")


def check_deadline(tx: Tx) -> None:
    rnd = tx.round
    if rnd is not None and rnd.secagg is not None:
        secure.sync(tx)  # its stages have deadlines of their own, within the attempt's
        return
    if rnd is None or rnd.state is not RoundState.OPEN or tx.now < rnd.deadline:
        return
    if rnd.has_quorum:
        close(tx, "deadline")
    else:
        fail_attempt(tx, f"deadline passed with {len(rnd.received)} of {rnd.quorum} updates")


def _finish_reporters(tx: Tx, rnd: Round, reason: str) -> None:
    for update in rnd.received:
        if tx.clients[update.client_id].state is ClientState.UPDATE:
            tx.move(update.client_id, ClientState.FINISH, reason)
