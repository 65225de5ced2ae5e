"""Starting a simulation's devices: threads in embedded mode, processes in full mode."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from devices.config import SimulatedBehaviour, TrainingConfig
from devices.run import run_device
from devices.training import SharedCompute
from fedmq.settings import Settings
from fedmq.wiring import device_config
from simulation.heterogeneity import cli_args


class Handle(Protocol):
    def join(self, timeout: float | None = None) -> None: ...


class ProcessHandle:
    """A child process that is asked to stop (SIGTERM) when joined, then killed if stuck."""

    def __init__(self, proc: subprocess.Popen[bytes], stop: threading.Event) -> None:
        self.proc = proc
        self.stop = stop

    def join(self, timeout: float | None = None) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop_processes(handles: list[ProcessHandle], timeout: float) -> None:
    """SIGTERM to every device at once, then wait for them all within ``timeout`` in
    total (not each: one after the other, 100 devices took up to 100 timeouts), then
    SIGKILL what is left."""
    for h in handles:
        if h.proc.poll() is None:
            h.proc.terminate()
    deadline = time.monotonic() + timeout
    for h in handles:
        try:
            h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait()


def device_broker_url(settings: Settings) -> str:
    """The URL devices connect with: the enrollment user's under `fedmq up` with broker
    users (they register through it and go on as their own users), else the stack's."""
    return (
        settings.device_broker_url.get_secret_value()
        if settings.device_broker_url
        else settings.broker_url
    )


def _env(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": device_broker_url(settings),
        "FEDMQ_DATABASE_URL": settings.database_url,
    }
    # Devices need no operator token, nor the management API's credentials.
    for name in ("FEDMQ_OPERATOR_TOKEN", "FEDMQ_BROKER_ACCOUNTS_URL", "FEDMQ_DEVICE_BROKER_URL"):
        env.pop(name, None)
    return env


def device_threads(
    settings: Settings,
    run_id: str,
    clients: int,
    dataset: str,
    model: str,
    partition: str,
    partition_args: dict[str, object],
    seed: int,
    encoding: str,
    stop: threading.Event,
    behaviours: list[SimulatedBehaviour] | None = None,
    *,
    flower_clients: Sequence[str | None] = (),
) -> list[Handle]:
    import torch

    torch.set_num_threads(1)  # K devices share this machine's cores ...
    compute = SharedCompute(os.cpu_count() or 1)  # ... and train that many at a time
    handles: list[Handle] = []
    for k in range(clients):
        config = device_config(
            settings,
            run_id,
            k,
            clients,
            training=TrainingConfig(
                dataset=dataset,
                model=model,
                partition=partition,
                partition_args=dict(partition_args),
                seed=seed,
                encoding=encoding,
                torch_threads=None,
                flower_client=_flower_client(flower_clients, k),
            ),
            simulated=behaviours[k] if behaviours else None,
            broker_url=device_broker_url(settings),
            # The in-process bus wakes a waiting device the moment a message comes; a short
            # poll only woke 1,000 idle devices 10,000 times a second to check the time
            # (a second still bounds how long a stopped device takes to notice).
            poll_s=1.0,
        )
        t = threading.Thread(
            target=run_device,
            args=(config, stop),
            kwargs={"compute": compute},
            name=f"device-{k}",
            daemon=True,
        )
        t.start()
        handles.append(t)
    return handles


def device_processes(
    settings: Settings,
    run_id: str,
    clients: int,
    dataset: str,
    model: str,
    partition: str,
    partition_args: str,
    seed: int,
    encoding: str,
    stop: threading.Event,
    logs: Path,
    behaviours: list[SimulatedBehaviour] | None = None,
    *,
    args_for: Callable[[int], Sequence[str]] = lambda k: (),
) -> list[ProcessHandle]:
    """``fedmq device`` processes, one per partition; ``args_for(k)`` are device k's
    extra options (a split fleet's ``--split``, a Flower client of its own)."""
    logs.mkdir(parents=True, exist_ok=True)
    handles: list[ProcessHandle] = []
    for k in range(clients):
        behaviour = behaviours[k] if behaviours else SimulatedBehaviour()
        cmd = [
            sys.executable,
            "-m",
            "fedmq.cli",
            "device",
            "--run",
            run_id,
            "--index",
            str(k),
            "--clients",
            str(clients),
            "--dataset",
            dataset,
            "--model",
            model,
            "--partition",
            partition,
            "--partition-args",
            partition_args,
            "--seed",
            str(seed),
            "--encoding",
            encoding,
            *cli_args(behaviour),
            *args_for(k),
        ]
        log = (logs / f"device-{k}.log").open("wb")
        proc = subprocess.Popen(cmd, env=_env(settings), stdout=log, stderr=subprocess.STDOUT)
        handles.append(ProcessHandle(proc, stop))
    return handles


def flower_args(flower_clients: Sequence[str | None], k: int) -> tuple[str, ...]:
    """Device k's options to run its Flower client, if it has one (devices/flower.py)."""
    flower = _flower_client(flower_clients, k)
    return () if flower is None else ("--flower-client", flower)


def _flower_client(flower_clients: Sequence[str | None], k: int) -> str | None:
    """Device k's Flower client, if it runs one (devices/flower.py)."""
    return flower_clients[k] if k < len(flower_clients) else None


def worker_process(
    settings: Settings, logs: Path, queues: str = "aggregate,evaluate", name: str = "worker"
) -> Handle:
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / f"{name}.log").open("wb")
    cmd = [sys.executable, "-m", "fedmq.cli", "worker", "--queues", queues]
    if name != "worker":  # a second worker on this host needs a node name of its own
        cmd.append(f"--hostname={name}@%h")
    proc = subprocess.Popen(cmd, env=_env(settings), stdout=log, stderr=subprocess.STDOUT)
    return ProcessHandle(proc, threading.Event())
