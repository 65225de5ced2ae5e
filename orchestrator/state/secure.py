"""SecAgg+ inside the round machine: a secure run's round attempt carries a ``SecAggRound``
(``orchestrator.state.secagg``) and moves through its stages on the machine's own inputs.

- The attempt opens as any other (announcement and model to the selected); it starts the
  sub-machine with the attempt's fresh devices (``start``). A secure retry carries no
  update: masks are per attempt, so an earlier attempt's masked input cannot be unmasked
  with this one's.
- A device's stage message (``SecAggMessage``, from the signals consumer) is stepped
  through the sub-machine; a refusal refuses the message with the sub-machine's reason.
- A masked input is an ordinary update: ``UpdateReceived`` counts it in the round (as
  any update) only if the sub-machine takes it as a ``MaskedInput`` (``masked``), so
  the round's received updates are exactly the sub-machine's masked inputs.
- Clients dropped from the attempt (left, kicked, timed out) reach it as ``DeviceLost``;
  every ``Tick`` lets its stage deadlines pass (``sync``).
- Its effects become the machine's: ``SecAggSend`` (the outbox publishes the roster, each
  inbox and the unmask request), ``SecAggStage`` records; ``Unmasked`` closes the round
  (``DispatchAggregate``: the worker unmasks), ``SecAggFailed`` fails the attempt with
  the reason (retried by policy like any failed attempt).

The graph seed is drawn from the run, round, attempt and the opening time by SHA-256:
the machine is deterministic and has no randomness of its own. The seed is public in
SecAgg+ anyway (the roster carries it); a server that chose graphs maliciously is outside
the honest-but-curious model (README, threat model).
"""

from __future__ import annotations

import hashlib

from orchestrator.state import secagg as sm
from orchestrator.state.effects import SecAggSend, SecAggStage
from orchestrator.state.inputs import SecAggMessage
from orchestrator.state.model import Round
from orchestrator.state.tx import Refused, Tx
from protocol.messages import RoundState

STAGES = 4  # advertise, share, collect, unmask: the attempt's deadline covers them all


def settings(tx: Tx) -> sm.RunSecAgg | None:
    raw = tx.base.secagg
    return None if raw is None else sm.RunSecAgg.from_dict(raw)


def attempt_deadline(tx: Tx) -> float | None:
    """A secure attempt's deadline: every stage at its limit."""
    cfg = settings(tx)
    return None if cfg is None else tx.now + STAGES * cfg.stage_s


def start(tx: Tx, number: int, attempt: int, selected: tuple[str, ...]) -> sm.SecAggRound | None:
    cfg = settings(tx)
    if cfg is None:
        return None
    seed = hashlib.sha256(
        f"fedmq-secagg-graph\n{tx.base.run_id}\n{number}\n{attempt}\n{tx.now!r}".encode()
    ).hexdigest()
    return sm.start(
        tx.base.run_id,
        number,
        attempt,
        selected,
        cfg.config,
        seed,
        now=tx.now,
        stage_s=cfg.stage_s,
    )


def _current(tx: Tx) -> tuple[Round, sm.SecAggRound] | None:
    rnd = tx.round
    if rnd is None or rnd.secagg is None or rnd.state is not RoundState.OPEN:
        return None
    return rnd, rnd.secagg


def on_message(tx: Tx, ev: SecAggMessage) -> None:
    """A device's keys, share boxes or revealed shares."""
    tx.live_client(ev.client_id)
    cur = _current(tx)
    if cur is None or (cur[0].number, cur[0].attempt) != (ev.round, ev.attempt):
        raise Refused(f"no secure round {ev.round} attempt {ev.attempt} is open")
    if ev.event.client_id != ev.client_id:
        raise Refused("a stage message names another device")
    tx.touch(ev.client_id)
    _step(tx, ev.event, refuse=True)


def masked(tx: Tx, client_id: str, ref: str, num_samples: int) -> None:
    """An update of a secure round: taken only as the sub-machine's masked input."""
    if _current(tx) is None:
        raise Refused("no secure round is open")
    _step(tx, sm.MaskedInput(client_id, ref, num_samples), refuse=True)


def sync(tx: Tx) -> None:
    """Clients dropped from the attempt reach the sub-machine, and time passes in it."""
    cur = _current(tx)
    if cur is None:
        return
    rnd, sa = cur
    for cid in sorted(set(rnd.dropped) - sa.offline):
        if not _step(tx, sm.DeviceLost(cid), refuse=False):
            return  # the attempt ended
    _step(tx, sm.Tick(), refuse=False)


def _step(tx: Tx, ev: sm.SecAggInput, *, refuse: bool) -> bool:
    """Step the open attempt's sub-machine; False once the attempt is no longer open."""
    from orchestrator.state import rounds  # rounds imports this module

    cur = _current(tx)
    if cur is None:
        return False
    rnd, sa = cur
    new, effects = sm.step(sa, ev, tx.now)
    for e in effects:
        if isinstance(e, sm.SecAggRefused):
            if refuse:
                raise Refused(e.reason)
            return True
    if new is not sa:
        tx.set_round(secagg=new)
        if new.stage is not sa.stage and new.stage not in (sm.Stage.DONE, sm.Stage.FAILED):
            tx.emit(SecAggStage(rnd.number, rnd.attempt, new.stage.value))
    for e in effects:
        send = _send(rnd, e)
        if send is not None:
            tx.emit(send)
        elif isinstance(e, sm.SecAggFailed):
            tx.emit(SecAggStage(rnd.number, rnd.attempt, "failed", e.reason))
            rounds.fail_attempt(tx, f"secure aggregation: {e.reason}")
            return False
        elif isinstance(e, sm.Unmasked):
            tx.emit(SecAggStage(rnd.number, rnd.attempt, "done"))
            _close(tx, new)
            return False
    return True


def _send(rnd: Round, e: sm.SecAggEffect) -> SecAggSend | None:
    """The machine's effect for a sub-machine's message to devices; None for the others."""
    if isinstance(e, sm.SendRoster):
        return SecAggSend(rnd.number, rnd.attempt, "roster", e.to, e.fields())
    if isinstance(e, sm.SendInbox):
        return SecAggSend(rnd.number, rnd.attempt, "inbox", (e.to,), {"boxes": dict(e.boxes)})
    if isinstance(e, sm.RequestUnmask):
        payload = {"survivors": list(e.survivors), "dropped": list(e.dropped)}
        return SecAggSend(rnd.number, rnd.attempt, "unmask", e.to, payload)
    return None


def _close(tx: Tx, sa: sm.SecAggRound) -> None:
    """The survivors' sum can be unmasked: the round closes with exactly their updates."""
    from orchestrator.state import rounds

    rnd = tx.round
    assert rnd is not None
    survivors = set(sa.survivors)
    if {u.client_id for u in rnd.received} != survivors:
        # Cannot happen: an update is received exactly when the sub-machine takes it.
        rounds.fail_attempt(tx, "secure aggregation: the received updates are not the survivors")
        return
    if not rnd.has_quorum:
        rounds.fail_attempt(
            tx,
            f"secure aggregation: {len(survivors)} survivors, below the round's quorum "
            f"{rnd.quorum}",
        )
        return
    rounds.close(tx, f"secure aggregation unmasked {len(survivors)} survivors")
