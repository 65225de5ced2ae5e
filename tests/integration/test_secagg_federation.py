"""SecAgg+ in full mode: RabbitMQ, Postgres, the orchestrator service, a Celery worker
process and devices on AMQP.

Ten devices (threads of this process, each with its own AMQP connection, so that the test
can read the quantised updates that never leave them) run four secure rounds:

1. all ten take part;
2. one vanishes after sharing its keys (before its masked input) and three (30 %) after
   sending their masked input (they never answer the unmask request): the round
   completes with the survivors' sum;
3. the six left take part;
4. four of the six vanish after sharing keys: two masked inputs are below the threshold
   of three, and the round fails with the reason.

Every stored update is the masked uint32 vector and nothing else; every round's ring sum,
unmasked again from the stored blobs and material, is exactly the sum of its survivors'
quantised updates; and the model version is FedAvg's step on its dequantised mean.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.client import FederatedClient
from devices.config import TrainingConfig
from fedmq.settings import Settings
from fedmq.wiring import device_config, open_bus, orchestrator_service
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol import codec
from protocol.bus import connect
from protocol.secagg import dequantize_mean, layout_of, unflatten
from protocol.secagg.blob import MASKED
from protocol.secagg.ring import add
from simulation import fleet_local
from simulation.simulate import SimOptions, _initial_model
from tests.faults.invariants import Invariants, unmask_from_material
from tests.integration.gateway_env import amqp_and_http_clients

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

K = 10
ROUNDS = 4


def _wait(what: str, check, timeout: float = 300.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_secure_rounds_survive_dropouts_and_fail_below_the_threshold(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    migrations.upgrade(pg_url)
    settings = Settings(broker_url=amqp_url, database_url=pg_url, heartbeat_interval_s=1.0)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    policy = RoundPolicy(
        min_clients=6, quorum_fraction=0.3, heartbeat_timeout_s=6.0, max_attempts=1
    )
    with session_scope(sessions) as s:
        run_id = create_run(
            s,
            "secagg",
            _initial_model(SimOptions()),
            policy=policy,
            strategy={"name": "fedavg"},
            train={"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
            secagg={"stage_s": 30.0},
        )
    service = orchestrator_service(settings, open_bus(settings))
    service.start()
    worker = fleet_local.worker_process(settings, tmp_path / "logs")
    clients = [
        FederatedClient(
            device_config(
                settings,
                run_id,
                k,
                K,
                training=TrainingConfig(encoding="fp32", torch_threads=None),
                poll_s=0.1,
            ),
            connect(amqp_url),
        )
        for k in range(K)
    ]
    for c in clients:
        c.secure.keep = ROUNDS  # the quantised updates, for the exact comparison
    # Round 2: 30 % vanish after masking, one before; round 4: four of six after sharing.
    for c in clients[1:4]:
        c.vanish = {2: "masked"}
    clients[4].vanish = {2: "shares"}
    for c in clients[5:9]:
        c.vanish = {4: "shares"}
    try:
        for c in clients:
            c.start(timeout=120)

        def ready() -> bool:
            with session_scope(sessions) as s:
                return sum(c.state == "ready" for c in q.list_clients(s, run_id)) == K

        _wait("ten ready devices", ready)
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(ROUNDS), time.time())

        def settled() -> list[tuple[int, str]] | None:
            with session_scope(sessions) as s:
                rows = [(r.number, str(r.state)) for r in q.list_rounds(s, run_id)]
            final = {"done", "failed"}
            return rows if len(rows) == ROUNDS and rows[-1][1] in final else None

        rows = _wait("four rounds", settled, timeout=700)
        assert rows == [(1, "done"), (2, "done"), (3, "done"), (4, "failed")]
        _check_rounds(sessions, run_id, clients)
        # The fault suite's invariant: nothing counted twice, every acknowledged update in
        # one row, each version the unmasked sum of exactly its survivors.
        # Devices that vanished right after masking never saw their notice: 10 + 6 + 6 + 2.
        acked = [m for c in clients for m in c.accepted]
        assert Invariants(sessions, run_id).check(acked) == len(set(acked)) >= 24
    finally:
        for c in clients:
            c.stop(leave=True, timeout=10)
        service.stop()
        worker.join(timeout=15)
        engine.dispose()


def _check_rounds(sessions, run_id: str, clients: list[FederatedClient]) -> None:  # type: ignore[no-untyped-def]
    by_id = {c.client_id: c for c in clients}
    accuracy = []
    with session_scope(sessions) as s:
        for r in q.list_rounds(s, run_id):
            survivors = {
                p.client_id: p.update_sha for p in q.received_updates(s, r.id) if p.update_sha
            }
            if r.number == 4:
                failed = [
                    e for e in q.list_events(s, run_id, kinds=["round.failed"]) if e.round == 4
                ]
                assert failed and "fewer than the threshold" in failed[0].detail["reason"]
                assert q.get_model_version(s, run_id, 4) is None
                continue
            want = {1: K, 2: K - 1, 3: K - 4}[r.number]
            assert len(survivors) == want, (r.number, sorted(survivors))
            mv = q.get_model_version_by_id(s, r.model_version_id)
            base = q.get_model_version_by_id(s, r.base_version_id)
            assert mv is not None and base is not None
            assert mv.metrics["fold"] == "secagg"
            assert mv.metrics["num_updates"] == want
            # No stored update is anything but the masked vector.
            masked = {}
            for cid, sha in survivors.items():
                tensors = codec.decode(blobstore.get(s, sha)).tensors
                assert list(tensors) == [MASKED] and tensors[MASKED].dtype == np.uint32
                masked[cid] = tensors[MASKED]
            # The ring sum the stored material unmasks is exactly the survivors' quantised
            # updates summed (which only the devices ever held).
            material = _material(s, mv)
            assert set(material["masked"]) == set(survivors)
            total = unmask_from_material(masked, material)
            expected = None
            for cid in survivors:
                qv = by_id[cid].secure.quantized[(r.number, 1)]
                expected = qv if expected is None else add(expected, qv)
                # The stored blob is independent of the update it hides (5 sigma apart).
                y = masked[cid].astype(np.float64)
                corr = abs(np.corrcoef(y, qv.view(np.int32).astype(np.float64))[0, 1])
                assert corr < 5 / np.sqrt(y.size), (cid, corr)
            assert np.array_equal(total, expected)
            # ... and the version is FedAvg's step on its dequantised mean.
            samples = sum(int(material["keys"][c][2]) for c in survivors)
            assert samples == sum(by_id[c].trainer.num_samples for c in survivors)
            base_w = codec.decode(blobstore.get(s, base.blob_sha)).tensors
            new_w = codec.decode(blobstore.get(s, mv.blob_sha)).tensors
            mean = unflatten(
                dequantize_mean(expected, samples, int(material["scale"])), layout_of(base_w)
            )
            for name, d in mean.items():
                np.testing.assert_allclose(new_w[name], base_w[name] + d, rtol=0, atol=1e-6)
            accuracy.append(float((r.metrics or {}).get("accuracy", 0.0)))
    assert accuracy[-1] > 0.5 and accuracy[-1] >= accuracy[0], accuracy


def _material(s, mv) -> dict:  # type: ignore[no-untyped-def]
    """The material the version names as the one it was unmasked with."""
    return json.loads(blobstore.get(s, mv.metrics["secagg"]["material"]))


@pytest.mark.timeout(300)
def test_amqp_and_http_devices_share_secure_rounds(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Two AMQP devices and two HTTP devices (one a ``fedmq device --transport http``
    process) through ``fedmq gateway``, with the orchestrator and a worker as processes:
    both secure rounds sum all four masked inputs."""
    from protocol.messages import CommandAction
    from tests.integration.orchestrator_harness import harness
    from tests.net import free_port, wait_http

    k, rounds = 4, 2
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    with harness(amqp_url, pg_url, tmp_path) as h:
        with session_scope(h.sessions) as s:
            h.run_id = create_run(
                s,
                "secagg-mixed",
                _initial_model(SimOptions()),
                policy=RoundPolicy(min_clients=k, quorum_fraction=1.0, max_attempts=1),
                extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
                secagg={"stage_s": 60.0},
            )
        h.procs.orchestrator()
        h.procs.start("gateway", "-m", "fedmq.cli", "gateway", "--port", str(port))
        h.procs.start(
            "device-http-3",
            *("-m", "fedmq.cli", "device", "--run", h.run_id, "--index", "3"),
            *("--clients", str(k), "--transport", "http", "--gateway", gateway),
            *("--rounds", str(rounds)),
        )
        wait_http(f"{gateway}/openapi.json")

        bus, clients = amqp_and_http_clients(h.run_id, k, amqp_url, gateway)
        for c in clients:
            c.secure.keep = rounds
        try:
            for c in clients:
                c.start(timeout=60)

            def ready() -> bool:
                with session_scope(h.sessions) as s:
                    return sum(c.state == "ready" for c in q.list_clients(s, h.run_id)) == k

            _wait("four ready devices", ready, timeout=120)
            h.command(CommandAction.AUTORUN, rounds=rounds)
            h.wait(
                lambda: sum(r.state == "done" for r in h.rounds()) == rounds,
                240,
                f"{rounds} secure rounds to be done",
            )
            assert [(r.number, r.received, r.attempt) for r in h.rounds()] == [
                (n, k, 1) for n in range(1, rounds + 1)
            ], h.procs.output()
            with session_scope(h.sessions) as s:
                for n in range(1, rounds + 1):
                    mv = q.get_model_version(s, h.run_id, n)
                    assert mv is not None and mv.metrics["fold"] == "secagg"
                    assert mv.metrics["secagg"]["survivors"] == k
                    rnd = q.get_round(s, h.run_id, n)
                    assert rnd is not None
                    for p in q.received_updates(s, rnd.id):
                        blob = blobstore.get(s, p.update_sha)
                        assert list(codec.decode(blob).tensors) == [MASKED]
            for c in clients:
                assert len(c.secure.quantized) == rounds, (c.config.name, c.errors)
            assert h.events("update.refused") == []
        finally:
            for c in clients:
                c.stop()
            bus.close()


@pytest.mark.timeout(400)
def test_fedmq_simulate_secagg_with_central_dp_in_full_mode_records_epsilon(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    """``fedmq simulate --secagg --broker --database`` (device processes, a worker process)
    with central DP: devices clip to C and weigh 1 before masking, the worker adds the
    noise once after unmasking, and every version records ε as the accountant says."""
    from typer.testing import CliRunner

    from fedmq.cli import app
    from learning.privacy import RoundEvent, epsilon_after

    clip, z = 0.5, 1.0
    args = ["simulate", "--secagg", "--clients", "4", "--rounds", "2", "--out", str(tmp_path)]
    args += ["--broker", amqp_url, "--database", pg_url, "--dp-noise", str(z)]
    args += ["--dp-clip", str(clip), "--dp-seed", "3"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "metrics.json").read_text())
    rounds = data["rounds"]
    want = [epsilon_after([RoundEvent(1.0, z)] * r, 1e-5) for r in (1, 2)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(want)
    run_id = data["config"]["run_id"]
    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        run = q.get_run(s, run_id)
        assert run is not None and run.config["train"]["secagg_l2_clip"] == clip
        for n in (1, 2):
            mv = q.get_model_version(s, run_id, n)
            assert mv is not None and mv.metrics["fold"] == "secagg"
            dp = mv.metrics["privacy"]
            assert dp["mode"] == "central" and dp["noise_std"] == pytest.approx(z * clip / 4)
            material = _material(s, mv)
            assert all(k[2] == 1 for k in material["keys"].values())  # unit weights
            rnd = q.get_round(s, run_id, n)
            assert rnd is not None
            for p in q.received_updates(s, rnd.id):
                assert list(codec.decode(blobstore.get(s, p.update_sha)).tensors) == [MASKED]
    engine.dispose()


def test_create_run_refuses_what_secure_rounds_cannot_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    model = _initial_model(SimOptions())
    central = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5}
    cases = [
        ({"secagg": {"threshold": 1.5}}, "threshold"),
        ({"secagg": {"stage_s": 0}}, "stage_s"),
        ({"secagg": {"rounds": 3}}, "unknown secagg settings"),
        ({"secagg": {}, "policy": RoundPolicy(mode="async")}, "async"),
        ({"secagg": {}, "split": {"model": {"name": "mlp"}}}, "split"),
        (
            {"secagg": {}, "extra_config": {"privacy": {**central, "adaptive": {"q": 0.5}}}},
            "adaptive",
        ),
    ]
    with session_scope(engine) as s:
        for kw, why in cases:
            with pytest.raises(ValueError, match=why):
                create_run(s, "bad", model, **kw)  # type: ignore[arg-type]
        run_id = create_run(
            s, "ok", model, secagg={"stage_s": 5}, extra_config={"privacy": central}
        )
        run = q.get_run(s, run_id)
        assert run is not None
        assert run.config["secagg"]["stage_s"] == 5.0
        assert run.config["train"] == {
            "secagg": True,
            "secagg_l2_clip": 0.5,
            "secagg_unit_weight": True,
        }
    engine.dispose()


def test_fedmq_run_create_takes_a_secagg_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedmq.cli import app
    from fedmq.settings import get_settings
    from orchestrator.store import load

    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    monkeypatch.setenv("FEDMQ_DATABASE_URL", url)
    get_settings.cache_clear()
    model = tmp_path / "model.bin"
    model.write_bytes(_initial_model(SimOptions()))
    create = ["run", "create", "--name", "secure", "--model", str(model), "--secagg"]
    try:
        done = CliRunner().invoke(app, [*create, '{"stage_s": 20}'], catch_exceptions=False)
        assert done.exit_code == 0, done.output
        run_id = done.stdout.strip().splitlines()[-1]
        refused = CliRunner().invoke(app, [*create, '{"threshold": 2}'])
        assert refused.exit_code == 2 and "threshold" in refused.output
    finally:
        get_settings.cache_clear()
    engine = make_engine(url)
    with session_scope(engine) as s:
        fed = load(s, run_id)
        assert fed is not None and fed.secagg is not None and fed.secagg["stage_s"] == 20.0
    engine.dispose()


def test_the_ingest_refuses_an_update_in_the_clear_for_a_secure_run(tmp_path: Path) -> None:
    """What a secure run's ingest stores is the masked vector or nothing: a blob of the
    model's own tensors (an update in the clear) is refused before it is stored."""
    import hashlib

    from orchestrator.ingest import Ingest, Refuse
    from protocol.codec import DecodeLimits
    from protocol.messages import UpdateMeta
    from protocol.secagg.blob import masked_spec

    url = f"sqlite:///{tmp_path / 'ingest.sqlite'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    initial = _initial_model(SimOptions())
    with session_scope(sessions) as s:
        run_id = create_run(s, "secure", initial, secagg={})
    ingest = Ingest(sessions, DecodeLimits(), lambda: None)
    model = codec.decode(initial).tensors
    spec = ingest._spec(run_id, 0)
    assert spec == masked_spec(codec.peek_header(initial).tensors)
    clear = codec.encode({k: v * 0.01 for k, v in model.items()}, codec.Encoding.FP32)
    size = spec[MASKED].shape[0]
    masked = codec.encode({MASKED: np.arange(size, dtype=np.uint32)}, codec.Encoding.FP32)
    for blob, ok in ((clear, False), (masked, True)):
        meta = UpdateMeta(
            run_id=run_id,
            client_id="c1",
            round=1,
            base_model_version=0,
            num_samples=10,
            encoding=codec.Encoding.FP32,
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            blob_bytes=len(blob),
        )
        if ok:
            ingest._check(blob, meta)
        else:
            with pytest.raises(Refuse, match="bad update blob"):
                ingest._check(blob, meta)
    engine.dispose()


@pytest.mark.timeout(300)
def test_secure_rounds_run_embedded_too(tmp_path: Path) -> None:
    """The same path on the embedded stack (SQLite, the in-process bus, eager tasks)."""
    from devices.config import DeviceConfig, WireConfig
    from workers.app import configure
    from workers.config import WorkerConfig

    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(url)
    settings = Settings(broker_url=f"memory://secagg-{tmp_path.name}", database_url=url)
    sessions = make_sessionmaker(make_engine(url))
    k = 4
    with session_scope(sessions) as s:
        run_id = create_run(
            s,
            "embedded",
            _initial_model(SimOptions()),
            policy=RoundPolicy(min_clients=k),
            extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
            secagg={"stage_s": 60},
        )
    service = orchestrator_service(settings)
    service.start()
    bus = connect(settings.broker_url)
    wire = WireConfig(heartbeat_s=0.5, poll_s=0.05)
    clients = [
        FederatedClient(DeviceConfig(run_id=run_id, client_index=i, num_clients=k, wire=wire), bus)
        for i in range(k)
    ]
    try:
        for c in clients:
            c.start()

        def ready() -> bool:
            with session_scope(sessions) as s:
                return sum(c.state == "ready" for c in q.list_clients(s, run_id)) == k

        _wait("four ready devices", ready, timeout=60)
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(2), time.time())

        def done() -> bool:
            with session_scope(sessions) as s:
                return [str(r.state) for r in q.list_rounds(s, run_id)] == ["done", "done"]

        _wait("two secure rounds", done, timeout=200)
        with session_scope(sessions) as s:
            for n in (1, 2):
                mv = q.get_model_version(s, run_id, n)
                assert mv is not None and mv.metrics["fold"] == "secagg"
                assert mv.metrics["secagg"]["survivors"] == k
        assert all(not c.errors for c in clients), [c.errors for c in clients]
    finally:
        for c in clients:
            c.stop()
        service.stop()
        configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app
