"""Smoke check of benchmarks/split_scenarios.py: all six scenarios run on the CPU, tiny."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import split_scenarios as bench

pytestmark = pytest.mark.timeout(120)


def test_the_six_scenarios_run_and_report_every_figure() -> None:
    setup = bench.Setup(
        devices=2,
        epochs=1,
        batch_size=32,
        dim=16,
        depth=1,
        heads=2,
        repeats=1,
        profile_batches=1,
        samples_per_device=96,
    )
    rows = bench.run(setup)
    assert [r["scenario"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["time_to_train_s"] > 0 and 0 <= r["accuracy"] <= 1
        assert r["matmul_s"] > 0 and r["softmax_s"] > 0
    for r in rows[1:]:
        assert r["edge_compute_s"] > 0 and r["groups"] >= 3  # 3 batches per device
        assert r["edge"]["devices_seen"] == 2 and r["edge"]["refused"] == 0
    text = bench.markdown(rows, setup)
    assert "no GPU was available" in text or "ran on" in text
    assert text.count("\n| ") == 7  # header + six rows
