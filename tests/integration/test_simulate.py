"""`fedmq simulate` runs a real federation: embedded, and on RabbitMQ + Postgres as processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import devices.local
from db import queries as q
from db.engine import make_engine, session_scope
from fedmq.cli import app


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _accuracies(out: Path) -> list[float]:
    data = json.loads((out / "metrics.json").read_text())
    return [r["accuracy"] for r in data["rounds"]]


def test_an_embedded_federation_learns_digits_and_leaves_its_outputs(tmp_path: Path) -> None:
    _run(["--clients", "3", "--rounds", "3", "--out", str(tmp_path)])
    acc = _accuracies(tmp_path)
    assert len(acc) == 3
    assert acc[-1] > 0.5  # chance is 0.1 (10 classes)
    assert acc[-1] >= acc[0]
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_fedprox_run_trains_its_devices_with_the_mu_it_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded devices are threads of this process: every local training call is seen,
    with the mu it really used, and compared with what the run and its versions record."""
    trained_with: list[tuple[float, bool]] = []  # (mu, anchored to the global model)
    train_local = devices.local.train_local

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs["lr"] > 0:  # not the warm-up pass, which learns nothing
            mu = kwargs.get("proximal_mu", 0.0)
            trained_with.append((mu, kwargs.get("global_params") is not None))
        return train_local(*args, **kwargs)

    monkeypatch.setattr(devices.local, "train_local", spy)
    _run(["--strategy", "fedprox", "--clients", "2", "--rounds", "2", "--out", str(tmp_path)])

    run_id = json.loads((tmp_path / "metrics.json").read_text())["config"]["run_id"]
    engine = make_engine(f"sqlite:///{tmp_path / 'fedmq.sqlite'}")
    with session_scope(engine) as s:
        run = q.get_run(s, run_id)
        assert run is not None
        config = dict(run.config)
        versions = [v.metrics or {} for v in q.list_model_versions(s, run_id)[1:]]
    engine.dispose()
    mu = config["strategy"]["proximal_mu"]
    assert mu == 0.01  # FedProx's default: the devices must not train FedAvg (mu 0)
    assert config["train"]["proximal_mu"] == mu
    assert len(versions) == 2 and all(v["strategy"]["proximal_mu"] == mu for v in versions)
    assert len(trained_with) >= 4 and set(trained_with) == {(mu, True)}  # 2 devices x 2 rounds


def test_proximal_mu_is_refused_without_fedprox(tmp_path: Path) -> None:
    args = ["simulate", "--proximal-mu", "0.1", "--rounds", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # one line for the reason
    assert result.exit_code == 2 and "--strategy fedprox" in result.output


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_full_mode_federation_runs_devices_and_a_worker_as_processes(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    _run(
        [
            "--clients",
            "3",
            "--rounds",
            "3",
            "--out",
            str(tmp_path),
            "--broker",
            amqp_url,
            "--database",
            pg_url,
        ]
    )
    acc = _accuracies(tmp_path)
    assert len(acc) == 3 and acc[-1] > 0.5
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["device-0.log", "device-1.log", "device-2.log", "worker.log"]
