"""The device's training slot: one job at a time off the loop's thread, slow devices take
longer, dropout dice are reproducible, and a failed training is handed back, not raised."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import numpy as np

from devices.config import DeviceConfig, SimulatedBehaviour
from devices.local import LocalUpdate
from devices.rounds import Job
from devices.training import SharedCompute, TrainingSlot
from protocol.messages import RoundAnnouncement, utcnow


class FakeTrainer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def step(  # type: ignore[no-untyped-def]
        self, global_weights, model_version, round_number, settings, *, attempt=1
    ) -> LocalUpdate:
        self.calls += 1
        if self.fail:
            raise RuntimeError("out of memory")
        return LocalUpdate(
            round=round_number,
            base_version=model_version,
            blob=b"x",
            num_samples=1,
            encoding="bf16",
            metrics={},
            sent={},
        )


def _job(round_number: int = 1) -> Job:
    ann = RoundAnnouncement(
        run_id="r",
        round=round_number,
        model_version=0,
        model_sha256="0" * 64,
        model_bytes=1,
        deadline=utcnow() + timedelta(seconds=30),
        selected=["c"],
    )
    return Job(ann, 1, {"w": np.zeros(2, np.float32)})


def _wait(slot: TrainingSlot, seconds: float = 5.0) -> tuple[Job, object]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = slot.collect()
        if done is not None:
            return done
        time.sleep(0.01)
    raise AssertionError("training never finished")


def test_a_job_runs_off_thread_and_is_collected_once() -> None:
    slot = TrainingSlot(FakeTrainer(), DeviceConfig("r", 0, 1), lambda: False)
    assert slot.collect() is None and not slot.busy
    slot.start(_job(3))
    assert slot.busy
    job, upd = _wait(slot)
    assert isinstance(upd, LocalUpdate) and upd.round == 3 == job.announcement.round
    assert slot.collect() is None and not slot.busy
    slot.shutdown()


def test_a_slow_device_takes_its_slowdown_longer() -> None:
    slot = TrainingSlot(
        FakeTrainer(),
        DeviceConfig("r", 0, 1, simulated=SimulatedBehaviour(slowdown_s=0.3)),
        lambda: False,
    )
    began = time.monotonic()
    slot.start(_job())
    _wait(slot)
    assert time.monotonic() - began >= 0.3
    slot.shutdown()


def test_a_failed_training_is_handed_back() -> None:
    slot = TrainingSlot(FakeTrainer(fail=True), DeviceConfig("r", 0, 1), lambda: False)
    slot.start(_job())
    _, upd = _wait(slot)
    assert isinstance(upd, RuntimeError) and "out of memory" in str(upd)
    slot.shutdown()


def test_dropout_dice_are_reproducible_and_near_their_probability() -> None:
    def rolls(index: int) -> list[bool]:
        slot = TrainingSlot(
            FakeTrainer(),
            DeviceConfig("r", index, 4, simulated=SimulatedBehaviour(dropout=0.3)),
            lambda: False,
        )
        return [slot.drops_out(r, 1) for r in range(1, 401)]

    assert rolls(1) == rolls(1)
    assert rolls(1) != rolls(2)
    assert 0.22 < sum(rolls(1)) / 400 < 0.38
    never = TrainingSlot(FakeTrainer(), DeviceConfig("r", 0, 1), lambda: False)
    assert not any(never.drops_out(r, 1) for r in range(1, 100))


class CountingTrainer(FakeTrainer):
    """Records how many of the devices sharing it train at once."""

    lock = threading.Lock()

    def __init__(self, gauge: dict[str, int]) -> None:
        super().__init__()
        self.gauge = gauge

    def step(  # type: ignore[no-untyped-def]
        self, global_weights, model_version, round_number, settings, *, attempt=1
    ) -> LocalUpdate:
        with self.lock:
            self.gauge["now"] += 1
            self.gauge["most"] = max(self.gauge["most"], self.gauge["now"])
        time.sleep(0.02)
        with self.lock:
            self.gauge["now"] -= 1
        return super().step(global_weights, model_version, round_number, settings)


def test_devices_sharing_compute_train_at_most_its_slots_at_once() -> None:
    compute = SharedCompute(2)
    gauge = {"now": 0, "most": 0}
    slots = [
        TrainingSlot(CountingTrainer(gauge), DeviceConfig("r", i, 8), lambda: False, compute)
        for i in range(8)
    ]
    for slot in slots:
        slot.start(_job())
    for slot in slots:
        _, upd = _wait(slot)
        assert isinstance(upd, LocalUpdate)
        slot.shutdown()
    assert gauge["most"] == 2


def test_a_slow_device_holds_no_shared_slot_while_it_is_slow() -> None:
    compute = SharedCompute(1)
    slow = TrainingSlot(
        FakeTrainer(),
        DeviceConfig("r", 0, 2, simulated=SimulatedBehaviour(slowdown_s=0.5)),
        lambda: False,
        compute,
    )
    fast = TrainingSlot(FakeTrainer(), DeviceConfig("r", 1, 2), lambda: False, compute)
    began = time.monotonic()
    slow.start(_job())
    fast.start(_job())
    _wait(fast)
    assert time.monotonic() - began < 0.5  # the one slot was free while the slow one slept
    _wait(slow)
    assert time.monotonic() - began >= 0.5
    for slot in (slow, fast):
        slot.shutdown()
