"""A device's local training off its loop's thread, and its simulated heterogeneity.

``TrainingSlot`` runs one job at a time on a worker thread that makes no bus call, so the
device loop keeps heartbeating and reading its queue however long training takes; the loop
``collect``s the finished update and sends it. Devices that share one process (an embedded
simulation's fleet) may share ``compute`` (``SharedCompute``): as many training threads as
the process has cores, so that at most that many train at once. A hundred trainings on two
cores at once made every one of them take the whole round (each op a contended GIL
hand-off), where one after another each is done in milliseconds and its update goes out
while others train; a simulation engine bounds its clients the same way (Flower's
``client_resources``).
The slot also plays the simulated device
behaviour of ``DeviceConfig.simulated``: a slow device's training takes ``slowdown_s`` longer, and
``drops_out`` rolls a device's dice for a round, seeded by (seed, device, round, attempt)
so that a fleet is reproducible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from devices.config import DeviceConfig, TrainSettings
from devices.local import LocalUpdate
from devices.rounds import Job


class Trainer(Protocol):
    """What the slot needs of ``LocalTrainer`` (or ``WasmTrainer``)."""

    def step(
        self,
        global_weights: Mapping[str, np.ndarray],
        model_version: int,
        round_number: int,
        settings: TrainSettings,
        *,
        attempt: int = 1,
    ) -> LocalUpdate: ...


class SharedCompute:
    """Training threads shared by the devices of one process: at most ``slots`` trainings
    at once, in the order they were started, each thread taking the next job as soon as
    its last one ended.

    It replaced a semaphore of ``slots`` over one training thread per device, which bounded
    the same way but made every training's end wake another device's thread to take the
    slot: a thread hand-off per training on top of the one that hands the update back,
    and a quarter of the interpreter's time in an embedded round of 100 devices (py-spy:
    ``Semaphore.release``).
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.pool = ThreadPoolExecutor(slots, thread_name_prefix="train-shared")


class TrainingSlot:
    def __init__(
        self,
        trainer: Trainer,
        config: DeviceConfig,
        stopping: Callable[[], bool],
        compute: SharedCompute | None = None,
    ) -> None:
        self.trainer, self.config, self.stopping = trainer, config, stopping
        self.compute = compute
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"train-{config.name}")
        self._running: tuple[Job, Future[LocalUpdate]] | None = None

    @property
    def busy(self) -> bool:
        return self._running is not None

    def drops_out(self, round_number: int, attempt: int) -> bool:
        if self.config.simulated.dropout <= 0:
            return False
        key = f"{self.config.training.seed}:{self.config.client_index}:{round_number}:{attempt}"
        return random.Random(key).random() < self.config.simulated.dropout

    def start(self, job: Job) -> None:
        assert self._running is None, "one training at a time"
        if self.compute is not None and self.config.simulated.slowdown_s <= 0:
            future = self.compute.pool.submit(self._step, job)
        else:  # a slow device waits out its slowness on its own thread, holding no slot
            future = self._pool.submit(self._train, job)
        self._running = (job, future)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the running job to finish; True once it has."""
        if self._running is None:
            return False
        try:
            self._running[1].exception(timeout)
        except TimeoutError:
            return False
        except CancelledError:
            pass
        return True

    def collect(self) -> tuple[Job, LocalUpdate | Exception] | None:
        """The finished job with its update (or the exception it raised); None while it
        still runs or when nothing was started."""
        if self._running is None or not self._running[1].done():
            return None
        job, future = self._running
        self._running = None
        try:
            return job, future.result()
        except Exception as e:  # reported by the caller: a device must not die of one round
            return job, e

    def shutdown(self) -> None:
        if self._running is not None:
            self._running[1].cancel()  # not started yet on the shared threads: never will
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _train(self, job: Job) -> LocalUpdate:
        """On this device's training thread: no bus calls here."""
        end = time.monotonic() + self.config.simulated.slowdown_s
        while time.monotonic() < end and not self.stopping():
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        if self.compute is None:
            return self._step(job)
        # After the simulated slowness: a slow device holds no slot meanwhile.
        return self.compute.pool.submit(self._step, job).result()

    def _step(self, job: Job) -> LocalUpdate:
        """The training itself, on a training thread (this device's or a shared one)."""
        ann = job.announcement
        settings = self.config.training.defaults.with_overrides(ann.train_config)
        args = (job.weights, ann.model_version, ann.round, settings)
        return self.trainer.step(*args, attempt=job.attempt)
