"""``step``: the one transition function of a federation. Pure and deterministic."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.state import buffered, control, rounds, secure
from orchestrator.state.effects import (
    ClientStateChanged,
    ClientWentOffline,
    Effect,
    Ignored,
    Rejected,
    UpdateAccepted,
)
from orchestrator.state.inputs import (
    AggregationFailed,
    AggregationSucceeded,
    Autorun,
    ClientJoined,
    ClientKicked,
    ClientLeft,
    ClientReady,
    ClientSignal,
    CloseRound,
    EvaluationFinished,
    Heartbeat,
    Input,
    OpenRound,
    Pause,
    Resume,
    SecAggMessage,
    StopAutorun,
    Tick,
    UpdateReceived,
)
from orchestrator.state.model import ClientRecord, Federation, Update, next_round_number
from orchestrator.state.tx import Refused, Tx
from protocol.messages import ClientState, RoundState

S = ClientState
_LIVE = [s for s in S if s is not S.OFFLINE]

# (current state, signalled state) → what happens; any pair not listed is rejected.
# The orchestrator, not the client, moves a client into training (when selected), update
# (when its update is stored) and finish (when its round closes), so a client's own
# training/update/finish signals only prove it alive; "ready" is how it asks to be selected.
SIGNAL_RULES: Mapping[tuple[ClientState, ClientState], str] = {
    **{(s, S.JOIN): "duplicate" for s in _LIVE},
    (S.OFFLINE, S.JOIN): "rejoin",
    **{(s, S.OFFLINE): "leave" for s in _LIVE},
    (S.OFFLINE, S.OFFLINE): "duplicate",
    (S.JOIN, S.READY): "ready",
    (S.FINISH, S.READY): "ready",
    (S.READY, S.READY): "alive",
    (S.TRAINING, S.TRAINING): "alive",
    (S.TRAINING, S.UPDATE): "alive",
    (S.UPDATE, S.UPDATE): "alive",
    (S.UPDATE, S.FINISH): "alive",
    (S.FINISH, S.FINISH): "alive",
}


def step(fed: Federation, event: Input, now: float) -> tuple[Federation, list[Effect]]:
    """Apply ``event`` at time ``now`` (POSIX seconds). ``fed`` itself is never modified.

    A refused event returns ``fed`` unchanged with one ``Rejected`` or ``Ignored`` effect.
    After any accepted event, whatever is due opens (a pending retry, the next autorun round).
    """
    handler = _HANDLERS.get(type(event))
    if handler is None:
        return fed, [Rejected(event, f"unknown event {type(event).__name__}")]
    tx = Tx(fed, now)
    asynchronous = buffered.is_async(tx)
    if asynchronous:
        handler = _ASYNC_HANDLERS.get(type(event), handler)
    try:
        handler(tx, event)
    except Refused as refused:
        if refused.ignored:
            return fed, [Ignored(event, refused.reason)]
        return fed, [Rejected(event, refused.reason, rejoin=refused.rejoin)]
    if asynchronous:
        buffered.advance(tx)
    else:
        rounds.try_open(tx)
    return tx.result(), tx.effects


# --- clients --------------------------------------------------------------------------------


def _signal(tx: Tx, client_id: str, state: ClientState) -> None:
    record = tx.clients.get(client_id)
    if record is None:
        if state is not S.JOIN:
            raise Refused(f"unknown client {client_id}")
        tx.clients[client_id] = ClientRecord(
            client_id, S.JOIN, tx.now, tx.now, next_round_number(tx.round)
        )
        tx.emit(ClientStateChanged(client_id, None, S.JOIN, "joined"))
        return
    rule = SIGNAL_RULES.get((record.state, state))
    if rule is None:
        if record.state is S.OFFLINE:
            tx.live_client(client_id)  # raises with the offline reason
        raise Refused(f"{client_id} is {record.state}: it cannot signal {state}")
    if rule == "duplicate":
        raise Refused(f"{client_id} is already {record.state}", ignored=True)
    if rule == "rejoin":
        if record.offline_reason == "kicked":
            raise Refused(f"{client_id} was kicked")
        tx.move(
            client_id,
            S.JOIN,
            "rejoined",
            joined_at=tx.now,
            last_seen=tx.now,
            eligible_from=next_round_number(tx.round),
            offline_reason=None,
        )
    elif rule == "leave":
        tx.go_offline(client_id, "left")
        rounds.check_complete(tx)
    else:
        tx.touch(client_id)
        if rule == "ready":
            tx.move(client_id, S.READY, "ready")


def _on_update(tx: Tx, ev: UpdateReceived) -> None:
    tx.client(ev.client_id)
    rnd = tx.round
    if rnd is not None and rnd.number == ev.round and rnd.has_received(ev.client_id):
        raise Refused(
            f"duplicate update from {ev.client_id} for round {ev.round}; the first is kept",
            ignored=True,
        )
    if rnd is None or rnd.number != ev.round or rnd.state is not RoundState.OPEN:
        raise Refused(f"round {ev.round} is not open")
    if not rnd.is_selected(ev.client_id):
        raise Refused(f"{ev.client_id} is not selected for round {ev.round}")
    if ev.client_id in rnd.dropped:
        raise Refused(f"{ev.client_id} was dropped from round {ev.round}")
    if ev.num_samples < 1 or not ev.ref:
        raise Refused("an update needs a ref and at least one sample")
    update = Update(ev.client_id, ev.ref, ev.num_samples)
    tx.round = rnd.with_update(update)
    tx.move(ev.client_id, S.UPDATE, f"update for round {ev.round} stored", last_seen=tx.now)
    tx.emit(UpdateAccepted(ev.round, ev.client_id, ev.ref, ev.num_samples))
    if rnd.secagg is not None:
        # Counted only as the sub-machine's masked input (a refusal undoes the lot).
        secure.masked(tx, ev.client_id, ev.ref, ev.num_samples)
    rounds.check_complete(tx)


# A heartbeat refreshes ``last_seen`` only once it is older than this share of the timeout.
HEARTBEAT_REFRESH = 0.25


def _on_heartbeat(tx: Tx, ev: Heartbeat) -> None:
    """A heartbeat only proves liveness. Refreshing ``last_seen`` on every one would make
    the service write the run's whole snapshot per heartbeat, most of its time with a large
    fleet; a refresh once ``last_seen`` is a quarter of the timeout old keeps any client that
    heartbeats faster than that at least three quarters of the timeout away from it."""
    record = tx.live_client(ev.client_id)
    if tx.now - record.last_seen >= HEARTBEAT_REFRESH * tx.policy.heartbeat_timeout_s:
        tx.touch(ev.client_id)


def _on_kick(tx: Tx, ev: ClientKicked) -> None:
    record = tx.client(ev.client_id)
    if record.offline_reason == "kicked":
        raise Refused(f"{ev.client_id} is already kicked", ignored=True)
    if record.state is S.OFFLINE:
        # Already gone; marking it kicked keeps it from joining again.
        tx.set_client(ev.client_id, offline_reason="kicked")
        tx.emit(ClientWentOffline(ev.client_id, S.OFFLINE, "kicked"))
        return
    tx.go_offline(ev.client_id, "kicked")
    rounds.check_complete(tx)


def _on_tick(tx: Tx, _: Tick) -> None:
    timeout = tx.policy.heartbeat_timeout_s

    def silent(record: ClientRecord) -> bool:
        return record.state is not S.OFFLINE and tx.now - record.last_seen > timeout

    # Sorted are only the few that went silent, not the fleet, at every tick.
    for cid in sorted(cid for cid, record in tx.clients.items() if silent(record)):
        if silent(tx.clients[cid]):  # still: an earlier one's step may have changed it
            tx.go_offline(cid, "timeout")
            rounds.check_complete(tx)
    rounds.check_deadline(tx)


def _no_manual_rounds(tx: Tx, ev: Input) -> None:
    raise Refused(
        f"{type(ev).__name__}: an async run opens its version steps itself (every "
        f"{tx.policy.buffer_size} buffered updates)"
    )


# Where an async run differs; every other input is handled as in a synchronous run.
_ASYNC_HANDLERS: dict[type, Callable[[Tx, Any], None]] = {
    UpdateReceived: buffered.on_update,
    OpenRound: _no_manual_rounds,
    CloseRound: _no_manual_rounds,
}


_HANDLERS: dict[type, Callable[[Tx, Any], None]] = {
    ClientJoined: lambda tx, ev: _signal(tx, ev.client_id, S.JOIN),
    ClientReady: lambda tx, ev: _signal(tx, ev.client_id, S.READY),
    ClientLeft: lambda tx, ev: _signal(tx, ev.client_id, S.OFFLINE),
    ClientSignal: lambda tx, ev: _signal(tx, ev.client_id, ev.state),
    Heartbeat: _on_heartbeat,
    UpdateReceived: _on_update,
    SecAggMessage: secure.on_message,
    ClientKicked: _on_kick,
    Tick: _on_tick,
    Autorun: control.on_autorun,
    StopAutorun: control.on_stop_autorun,
    OpenRound: control.on_open,
    CloseRound: control.on_close,
    Pause: control.on_pause,
    Resume: control.on_resume,
    AggregationSucceeded: control.on_aggregated,
    AggregationFailed: control.on_aggregation_failed,
    EvaluationFinished: control.on_evaluated,
}
