"""Differential privacy in whole federations: the budget stops an embedded run, local DP
reaches the devices through the run config, and a full-mode central-DP run records ε."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from db import blobstore
from db import queries as q
from db.engine import make_engine, session_scope
from db.queries import dashboard as dq
from fedmq.cli import app
from learning.privacy import RoundEvent, epsilon_after
from orchestrator.store import load
from protocol.codec import decode


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _metrics(out: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((out / "metrics.json").read_text())
    return data


@pytest.mark.timeout(300)
def test_the_epsilon_budget_stops_an_embedded_run_before_it_is_passed(tmp_path: Path) -> None:
    # 3 devices, all selected every round (q = 1), z = 2, δ = 1e-5: ε is 2.17, 3.19, 4.01,
    # 4.75 after rounds 1..4, so a budget of 4.5 allows 3 of the 10 rounds asked for.
    _run(
        ["--clients", "3", "--rounds", "10", "--out", str(tmp_path), "--dp-noise", "2",
         "--dp-clip", "1", "--dp-epsilon", "4.5", "--dp-seed", "1"]
    )  # fmt: skip
    data = _metrics(tmp_path)
    rounds = data["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 3
    want = [epsilon_after([RoundEvent(1.0, 2.0)] * r, 1e-5) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(want)
    assert want[-1] <= 4.5 < epsilon_after([RoundEvent(1.0, 2.0)] * 4, 1e-5)
    run_id = data["config"]["run_id"]  # type: ignore[index]
    engine = make_engine(f"sqlite:///{tmp_path / 'fedmq.sqlite'}")
    with session_scope(engine) as s:
        run = q.get_run(s, run_id)
        assert run is not None and run.config["privacy"]["epsilon_budget"] == 4.5
        assert run.autorun_remaining is None
        assert len(q.list_rounds(s, run_id)) == 3  # no fourth round was opened
        fed = load(s, run_id)
        latest = q.latest_model_version(s, run_id)
        assert latest is not None
        dp = latest.metrics["privacy"]
        assert dp["mode"] == "central" and "budget spent" in dp["budget_spent"]
        assert dp["noise_std"] == pytest.approx(2.0 * 1.0 / 3)
        assert fed is not None and fed.stopped == dp["budget_spent"]
        # The dashboard's overview and rounds pages read the same ε.
        ov = dq.run_overview(s, run_id)
        assert ov is not None and ov.privacy is not None
        assert ov.privacy["epsilon"] == pytest.approx(want[-1])
        assert ov.privacy["budget_spent"] == dp["budget_spent"]
        assert [r.epsilon for r in dq.round_stats(s, [run_id])] == pytest.approx(want)
    engine.dispose()


@pytest.mark.timeout(300)
def test_local_dp_reaches_the_devices_through_the_run_config(tmp_path: Path) -> None:
    # No noise and a tiny clip norm: every stored update must be clipped to it, which only
    # a device that read the run's train config can have done.
    clip = 1e-3
    _run(
        ["--clients", "3", "--rounds", "2", "--out", str(tmp_path), "--dp-noise", "0",
         "--dp-clip", str(clip), "--dp-mode", "local", "--encoding", "fp32"]
    )  # fmt: skip
    run_id = _metrics(tmp_path)["config"]["run_id"]  # type: ignore[index]
    engine = make_engine(f"sqlite:///{tmp_path / 'fedmq.sqlite'}")
    norms = []
    with session_scope(engine) as s:
        run = q.get_run(s, run_id)
        assert run is not None
        train = run.config["train"]
        assert (train["dp_clip_norm"], train["dp_noise_multiplier"]) == (clip, 0.0)
        for r in q.list_rounds(s, run_id):
            for p in q.received_updates(s, r.id):
                assert p.update_sha is not None
                t = decode(blobstore.get(s, p.update_sha)).tensors
                floats = [v.astype(np.float64) for v in t.values() if v.dtype.kind == "f"]
                norms.append(math.sqrt(sum(float(np.sum(v**2)) for v in floats)))
        latest = q.latest_model_version(s, run_id)
        assert latest is not None and latest.metrics["privacy"]["mode"] == "local"
        assert latest.metrics["privacy"]["epsilon"] is None  # no noise: ε unbounded
    engine.dispose()
    assert len(norms) == 6
    assert all(0 < n <= clip * (1 + 1e-5) for n in norms)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_full_mode_central_dp_run_completes_rounds_and_records_epsilon(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    _run(
        ["--clients", "3", "--rounds", "2", "--out", str(tmp_path), "--broker", amqp_url,
         "--database", pg_url, "--dp-noise", "1.0", "--dp-clip", "0.5", "--dp-adaptive"]
    )  # fmt: skip
    rounds = _metrics(tmp_path)["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 2
    want = [epsilon_after([RoundEvent(1.0, 1.0)] * r, 1e-5) for r in (1, 2)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(want)
