"""Split training through RabbitMQ: exact weights with one device, a real edge worker
process on the ``edge`` queue, and a clear error on the device when that worker dies."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from devices.split import BusEdge, EdgeUnavailable
from protocol.bus import AmqpBus
from protocol.codec import decode
from tests.split_helpers import (
    data,
    edge_in_thread,
    max_relative_error,
    reference,
    spec,
    train_device,
)
from workers.app import EDGE_SESSION_TASK, create_app
from workers.config import WorkerConfig
from workers.edge.task import body_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_one_device_through_rabbitmq_trains_the_weights_of_unsplit_training(
    amqp_url: str,
) -> None:
    sid = f"s{uuid.uuid4().hex[:8]}"
    x, y = data()
    with (
        AmqpBus(amqp_url) as bus,
        edge_in_thread(bus, spec(sid, expected_devices=1)) as (engine, names, result),
    ):
        device = train_device(bus, sid, "d1", x, y, encoding="fp32")
    got = {**device, **body_state(engine, names)}
    assert max_relative_error(got, reference(x, y)) <= 1e-5
    assert result["groups"] == 8 and result["refused"] == 0


@pytest.fixture
def edge_worker(amqp_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_RESULT_BACKEND": "rpc://",
        "FEDMQ_WORKER_DEVICE": "auto",
    }
    log = (tmp_path / "edge.log").open("wb")
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "edge"),
        *("--concurrency", "1", "--pool", "solo", "--loglevel", "INFO", "-n", "edge@%h"),
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    yield proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()


def test_an_edge_worker_process_serves_a_session_and_its_death_is_a_clear_error(
    amqp_url: str, edge_worker: subprocess.Popen[bytes]
) -> None:
    sid = f"s{uuid.uuid4().hex[:8]}"
    x, y = data()
    client = create_app(WorkerConfig(broker_url=amqp_url, result_backend="rpc://"))
    session = {**spec(sid, expected_devices=1), "return_body": True}
    pending = client.send_task(EDGE_SESSION_TASK, args=[session], queue="edge")
    with AmqpBus(amqp_url) as bus:
        # connect_timeout_s: the worker may still be starting when the device first asks.
        device = train_device(bus, sid, "d1", x, y, encoding="fp32", connect_timeout_s=60)
        result = pending.get(timeout=60)
        body = decode(base64.b64decode(result["body_blob_b64"])).tensors
        assert max_relative_error({**device, **body}, reference(x, y)) <= 1e-5
        assert result["devices_seen"] == 1 and result["session_id"] == sid

        # A second session, then the worker dies under it.
        sid2 = f"s{uuid.uuid4().hex[:8]}"
        client.send_task(EDGE_SESSION_TASK, args=[spec(sid2, expected_devices=1)], queue="edge")
        edge = BusEdge(bus, sid2, "d2", timeout_s=5, connect_timeout_s=60)
        with pytest.raises(EdgeUnavailable, match="cannot take this input"):
            edge.forward(torch.zeros(4, 64))  # raw inputs are not what the body takes
        edge.forward(torch.zeros(4, 32))  # served: the session is up
        os.killpg(edge_worker.pid, signal.SIGKILL)
        edge_worker.wait(timeout=10)
        with pytest.raises(EdgeUnavailable) as err:
            edge.backward(torch.zeros(4, 16))
            edge.forward(torch.zeros(4, 32))
        assert "not serving" in str(err.value) or "did not answer" in str(err.value)
        edge.close()
