"""Operator commands and task outcomes: handlers for ``machine.step``."""

from __future__ import annotations

from orchestrator.state import rounds
from orchestrator.state.effects import (
    AutorunChanged,
    DispatchAggregate,
    DispatchEvaluate,
    PauseChanged,
    RoundDone,
    RoundFailed,
)
from orchestrator.state.inputs import (
    AggregationFailed,
    AggregationSucceeded,
    Autorun,
    CloseRound,
    EvaluationFinished,
    OpenRound,
    Pause,
    Resume,
    StopAutorun,
)
from orchestrator.state.tx import Refused, Tx
from protocol.messages import RoundState

# --- commands -------------------------------------------------------------------------------


def on_autorun(tx: Tx, ev: Autorun) -> None:
    if tx.stopped:
        raise Refused(f"the run is stopped: {tx.stopped}")
    if ev.rounds < 1:
        raise Refused("autorun needs at least one round")
    tx.autorun_remaining = ev.rounds
    tx.emit(AutorunChanged(ev.rounds, "started"))


def on_stop_autorun(tx: Tx, _: StopAutorun) -> None:
    """No further round opens; one in flight finishes, a retry not yet opened is given up."""
    rnd = tx.round
    if not tx.autorun_remaining and not (rnd is not None and rnd.retry_pending):
        raise Refused("autorun is not running", ignored=True)
    if tx.autorun_remaining:
        tx.autorun_remaining = None
        tx.emit(AutorunChanged(None, "stopped by operator"))
    if rnd is not None and rnd.retry_pending:
        reason = "retry given up: stopped by operator"
        tx.set_round(failure=reason)
        tx.emit(RoundFailed(rnd.number, rnd.attempt, reason, final=True))
        rounds.fail_for_good(tx)


def on_open(tx: Tx, _: OpenRound) -> None:
    rnd = tx.round
    if rnd is not None and rnd.in_flight:
        raise Refused(f"round {rnd.number} is {rnd.state}")
    if tx.paused:
        raise Refused("the run is paused")
    if tx.stopped and not (rnd is not None and rnd.retry_pending):
        raise Refused(f"the run is stopped: {tx.stopped}")
    why_not = rounds.open_next(tx)
    if why_not is not None:
        raise Refused(why_not)


def on_close(tx: Tx, _: CloseRound) -> None:
    rnd = tx.round
    if rnd is None or rnd.state is not RoundState.OPEN:
        raise Refused("no round is open")
    if rnd.secagg is not None:
        raise Refused(
            f"round {rnd.number} is secure: it closes when its survivors' sum can be unmasked "
            f"(stage {rnd.secagg.stage})"
        )
    if not rnd.has_quorum:
        raise Refused(f"round {rnd.number} has {len(rnd.received)} of {rnd.quorum} updates")
    rounds.close(tx, "closed by operator")


def on_pause(tx: Tx, _: Pause) -> None:
    if tx.paused:
        raise Refused("already paused", ignored=True)
    tx.paused = True
    tx.emit(PauseChanged(True))


def on_resume(tx: Tx, _: Resume) -> None:
    if not tx.paused:
        raise Refused("not paused", ignored=True)
    tx.paused = False
    tx.emit(PauseChanged(False))


# --- task outcomes --------------------------------------------------------------------------


def _current(tx: Tx, number: int, state: RoundState) -> None:
    rnd = tx.round
    if rnd is None or rnd.number != number or rnd.state is not state:
        raise Refused(f"round {number} is not {state}: stale or repeated outcome", ignored=True)


def on_aggregated(tx: Tx, ev: AggregationSucceeded) -> None:
    _current(tx, ev.round, RoundState.AGGREGATING)
    if ev.model_version <= tx.model_version:
        raise Refused(f"model version {ev.model_version} is not after {tx.model_version}")
    tx.set_round(state=RoundState.EVALUATING, model_version=ev.model_version)
    tx.model_version = ev.model_version
    if ev.stop_reason:
        tx.stopped = ev.stop_reason
    tx.emit(DispatchEvaluate(ev.round, ev.model_version))


def on_aggregation_failed(tx: Tx, ev: AggregationFailed) -> None:
    _current(tx, ev.round, RoundState.AGGREGATING)
    rnd = tx.round
    assert rnd is not None
    if ev.retryable and rnd.aggregation_retries < tx.policy.max_aggregation_retries:
        retry = rnd.aggregation_retries + 1
        tx.set_round(aggregation_retries=retry)
        tx.emit(
            DispatchAggregate(
                rnd.number, rnd.attempt, tuple(rnd.received), rnd.base_model_version, retry
            )
        )
        return
    reason = f"aggregation failed: {ev.error}"
    tx.set_round(state=RoundState.FAILED, failure=reason)
    tx.emit(RoundFailed(rnd.number, rnd.attempt, reason, final=True))
    rounds.fail_for_good(tx)


def on_evaluated(tx: Tx, ev: EvaluationFinished) -> None:
    _current(tx, ev.round, RoundState.EVALUATING)
    rnd = tx.round
    assert rnd is not None and rnd.model_version is not None
    tx.set_round(state=RoundState.DONE, metrics=dict(ev.metrics))
    tx.last_completed_round = rnd.number
    seconds = max(0.0, tx.now - rnd.opened_at)
    tx.emit(RoundDone(rnd.number, rnd.model_version, dict(ev.metrics), seconds))
    if tx.autorun_remaining:
        tx.autorun_remaining -= 1
        left = tx.autorun_remaining
        if tx.stopped:
            # The privacy budget is spent: autorun ends here, whatever rounds it had left.
            tx.autorun_remaining = None
            tx.emit(AutorunChanged(None, tx.stopped))
        else:
            tx.emit(AutorunChanged(left, "finished" if left == 0 else f"round {rnd.number} done"))
