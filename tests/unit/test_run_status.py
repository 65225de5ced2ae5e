"""The run status the dashboard shows follows the round machine's state."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.projection import run_status
from orchestrator.state import Federation, Round
from protocol.messages import RoundState


def _round(state: RoundState, *, retry_pending: bool = False) -> Round:
    return Round(
        number=1,
        attempt=1,
        state=state,
        selected=("a",),
        quorum=1,
        opened_at=0.0,
        deadline=10.0,
        base_model_version=0,
        retry_pending=retry_pending,
    )


def test_a_new_run_is_created() -> None:
    assert run_status(Federation(run_id="r")) == "created"


def test_pending_autorun_or_a_round_in_flight_is_running() -> None:
    assert run_status(Federation(run_id="r", autorun_remaining=3)) == "running"
    for state in (RoundState.OPEN, RoundState.AGGREGATING, RoundState.EVALUATING):
        assert run_status(Federation(run_id="r", round=_round(state))) == "running"
    pending = _round(RoundState.FAILED, retry_pending=True)
    assert run_status(Federation(run_id="r", round=pending)) == "running"


def test_pause_wins_over_everything() -> None:
    fed = Federation(run_id="r", round=_round(RoundState.OPEN), paused=True)
    assert run_status(fed) == "paused"


def test_finished_after_autorun_and_failed_after_a_final_failure() -> None:
    done = Federation(run_id="r", round=_round(RoundState.DONE), autorun_remaining=0)
    assert run_status(done) == "finished"
    assert run_status(replace(done, round=_round(RoundState.FAILED))) == "failed"
