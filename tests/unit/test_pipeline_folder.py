"""The device folder on the CPU (``workers.pipeline.folder``), its staging rotation, and
the choice of folder (``make_folder``) with the worker's device setting.

The CUDA side of the same folder is tested in test_pipeline_gpu.py (``pytest -m gpu``).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedmq.settings import Settings
from learning.strategies import STRATEGIES, StackedUpdates, WeightedMean, make_strategy
from protocol.codec import Encoding, encode
from workers.config import WorkerConfig
from workers.fold import GlobalModel, UpdateRef, fold_updates, folds_linearly, make_folder
from workers.pipeline import device as device_mod
from workers.pipeline.device import DEVICE_PATTERN, DeviceUnavailable, check_device_name
from workers.pipeline.folder import TorchFolder
from workers.pipeline.staging import FlatLayout, Slot, staging_slot

SHAPES = {"a.weight": (40, 30), "a.bias": (40,), "b.weight": (7, 3, 3, 3), "scale": ()}
LINEAR = sorted(name for name, cls in STRATEGIES.items() if folds_linearly(cls()))


def _updates(k: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
        for _ in range(k)
    ]


def test_the_linear_strategies_are_the_weighted_mean_family() -> None:
    assert LINEAR == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi"]


# --- staging rotation: pure logic ---------------------------------------------------------


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_a_staging_buffer_is_reused_only_after_its_previous_copy(buffers: int) -> None:
    last_user: dict[int, int] = {}
    for k in range(50):
        slot = staging_slot(k, buffers)
        # the buffer's previous user is exactly the copy the slot says to wait for
        assert slot.reuses == last_user.get(slot.buffer)
        last_user[slot.buffer] = k
    if buffers >= 2:
        # double buffering: staging update k never waits for the copy of update k-1,
        # the one that may still be in flight, so the two overlap
        assert all(staging_slot(k, buffers).reuses != k - 1 for k in range(1, 50))
    assert staging_slot(0, 2) == Slot(0, None) and staging_slot(5, 2) == Slot(1, 3)


def test_staging_slot_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        staging_slot(0, 0)
    with pytest.raises(ValueError):
        staging_slot(-1, 2)


def test_flat_layout_packs_and_unpacks_every_tensor_in_place() -> None:
    (u,) = _updates(1)
    layout = FlatLayout.of(u)
    assert layout.size == sum(v.size for v in u.values())
    flat = np.full(layout.size, np.nan, dtype=np.float32)
    layout.pack(u, flat)
    assert not np.isnan(flat).any()
    back = layout.unpack(flat)
    assert list(back) == list(u)
    for name, v in u.items():
        assert back[name].shape == v.shape and np.array_equal(back[name], v)
        assert np.shares_memory(back[name], flat)
    with pytest.raises(ValueError, match="different tensors"):
        layout.check({k: v for k, v in u.items() if k != "scale"})
    with pytest.raises(ValueError, match="expected"):
        layout.check({**u, "a.bias": np.zeros(41, np.float32)})


# --- the folder on the CPU ----------------------------------------------------------------


def test_the_torch_folder_on_cpu_equals_the_numpy_accumulator() -> None:
    ups = _updates(9)
    weights = [1.0, 250.0, 37.0, 4.0, 99.0, 1e4, 3.0, 17.0, 0.5]
    ref, dev = WeightedMean(), TorchFolder("cpu")
    for u, w in zip(ups, weights, strict=True):
        ref.add(u, w)
        dev.add(u, w)
    assert dev.count == ref.count == 9 and dev.total_weight == ref.total_weight
    want, got = ref.result(), dev.result()
    assert list(got) == list(want)
    for name in SHAPES:
        assert got[name].dtype == np.float64 and got[name].shape == want[name].shape
        assert np.array_equal(got[name], want[name])  # the same float64 operations, in order
    t = dev.timings
    assert t.updates == 9 and t.copy_s == 0.0 and t.total_s >= t.stage_s + t.compute_s > 0


def test_the_torch_folder_on_cpu_gives_the_numpy_partial_sums_bit_for_bit() -> None:
    ups = _updates(5, seed=4)
    ref, dev = WeightedMean(), TorchFolder("cpu")
    for i, u in enumerate(ups):
        ref.add(u, 10 + 3 * i)
        dev.add(u, 10 + 3 * i)
    want, got = ref.partial(), dev.partial()
    assert (got.count, got.total_weight) == (want.count, want.total_weight) == (5, 80.0)
    for name in SHAPES:
        assert got.sums[name].dtype == np.float64
        assert got.sums[name].tobytes() == want.sums[name].tobytes()  # not divided, either
    with pytest.raises(ValueError, match="partial\\(\\) took the sums"):
        dev.result()
    with pytest.raises(ValueError, match="already taken"):
        dev.add(ups[0], 1.0)


def test_the_torch_folder_folds_in_slices_past_the_slice_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("workers.pipeline.folder.CPU_SLICE", 7)  # many slices, a ragged end
    ups = _updates(3, seed=2)
    ref, dev = WeightedMean(), TorchFolder("cpu")
    for i, u in enumerate(ups):
        ref.add(u, 1 + i)
        dev.add(u, 1 + i)
    want, got = ref.result(), dev.result()
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-15)


def test_the_torch_folder_refuses_what_the_numpy_accumulator_refuses() -> None:
    folder = TorchFolder("cpu")
    with pytest.raises(ValueError, match="no updates"):
        folder.result()
    u, v = _updates(2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            folder.add(u, bad)
    folder.add(u, 2.0)
    with pytest.raises(ValueError, match="different tensors"):
        folder.add({k: x for k, x in v.items() if k != "scale"}, 1.0)
    with pytest.raises(ValueError, match="expected"):
        folder.add({**v, "a.weight": np.zeros((30, 40), np.float32)}, 1.0)
    folder.add(v, 2.0)  # a refused update changes nothing
    got = folder.result()
    np.testing.assert_allclose(got["a.bias"], (u["a.bias"] + v["a.bias"]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="already taken"):
        folder.add(u, 1.0)


@pytest.mark.parametrize("name", LINEAR)
def test_each_linear_strategy_steps_the_same_on_the_torch_folder(name: str) -> None:
    rng = np.random.default_rng(7)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    counts = [10, 250, 37, 4, 99]
    blobs = {}
    for i in range(len(counts)):
        client = {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
                  for n, v in base.items()}  # fmt: skip
        blobs[f"{i:064x}"] = encode(client, Encoding.BF16, base=base, base_version="0")
    model = GlobalModel.from_tensors(base, "0")
    refs = [
        UpdateRef(f"c{i}", sha, n) for i, (sha, n) in enumerate(zip(blobs, counts, strict=True))
    ]
    results = []
    for folder_of in (lambda s: s.accumulator(len(refs)), lambda _s: TorchFolder("cpu")):
        strategy = make_strategy(name, clip_norm=0.5)  # clipping happens before the fold
        folded = fold_updates(refs, blobs.__getitem__, model, strategy, folder=folder_of(strategy))
        state: dict[str, np.ndarray] = {}
        for _ in range(2):  # two server steps, so that optimiser state matters
            weights, state = strategy.step(base, folded.delta, state)
        results.append((weights, state))
    (w_ref, s_ref), (w_dev, s_dev) = results
    assert w_dev.keys() == w_ref.keys() and s_dev.keys() == s_ref.keys()
    for n in w_ref:
        np.testing.assert_allclose(w_dev[n], w_ref[n], rtol=1e-6, atol=1e-6)
    for n in s_ref:
        np.testing.assert_allclose(s_dev[n], s_ref[n], rtol=1e-6, atol=1e-6)


# --- choosing the folder: the device setting ------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as CI sees it, whatever it has (the check is about the message)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["cpu", "CPU", " cuda ", "cuda:0", "cuda:12", "auto"])
def test_device_names_are_accepted(name: str) -> None:
    assert check_device_name(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda0", "mps", "", "cpu:0"])
def test_other_device_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
        check_device_name(name)
    with pytest.raises(ValueError):
        WorkerConfig(device=name)
    with pytest.raises(ValueError):
        Settings(_env_file=None, worker_device=name)  # type: ignore[call-arg]


def test_settings_and_worker_config_accept_the_same_device_names() -> None:
    field = Settings.model_fields["worker_device"]
    assert any(getattr(m, "pattern", None) == DEVICE_PATTERN for m in field.metadata)
    for name in ("cpu", "cuda", "cuda:3", "auto"):
        assert Settings(_env_file=None, worker_device=name).worker_device == name  # type: ignore[call-arg]
        assert WorkerConfig(device=name).device == name
    assert WorkerConfig.from_env({"FEDMQ_WORKER_DEVICE": "Auto"}).device == "auto"


def test_cpu_gives_the_strategys_own_accumulator() -> None:
    assert isinstance(make_folder(make_strategy("fedavg"), 3, "cpu"), WeightedMean)
    assert isinstance(make_folder(make_strategy("fedmedian"), 3, "cpu"), StackedUpdates)


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(name: str) -> None:
    with pytest.raises(DeviceUnavailable, match="no CUDA device is available") as e:
        make_folder(make_strategy("fedavg"), 3, name)
    assert "FEDMQ_WORKER_DEVICE" in str(e.value) and "'auto'" in str(e.value)
    with pytest.raises(DeviceUnavailable):
        make_folder(make_strategy("fedmedian"), 3, name)  # a config error, whatever combines


@pytest.mark.usefixtures("no_gpu")
def test_auto_without_a_gpu_falls_back_to_the_cpu_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger=device_mod.__name__):
        folder = make_folder(make_strategy("fedadam"), 3, "auto")
    assert isinstance(folder, WeightedMean)
    assert "folding on the CPU" in caplog.text


def test_robust_strategies_stay_on_the_cpu_on_any_device(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend a GPU resolved, to see the choice alone (no CUDA call is made for them).
    monkeypatch.setattr("workers.fold.resolve_device", lambda _name: torch.device("cuda", 0))
    with caplog.at_level(logging.INFO, logger="workers.fold"):
        for name in ("fedmedian", "fedtrimmedavg"):
            assert isinstance(make_folder(make_strategy(name), 4, "cuda"), StackedUpdates)
    assert "combines on the CPU" in caplog.text
