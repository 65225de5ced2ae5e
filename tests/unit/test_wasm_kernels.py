"""The WASM kernels against PyTorch: the same weights and batch give the same loss,
gradients and SGD-with-momentum update to 1e-5 relative, for several layer sizes (including
ones that are no multiple of the SIMD width, the register tile or the cache blocks, so that
every edge path of the blocked GEMM runs); a whole epoch in one call trains what PyTorch's
loop over the same batches trains; and the committed kernels.wasm is what
scripts/build-wasm.sh builds from kernels.c."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devices.wasm import MODULE_PATH
from devices.wasm_runtime import WasmMLP
from learning.models import MLP, MLPConfig

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the reference tensor's scale (max |b|)."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _pair(widths: list[int], seed: int) -> tuple[MLP, WasmMLP]:
    torch.manual_seed(seed)
    model = MLP(MLPConfig(widths[0], tuple(widths[1:-1]), widths[-1]))
    wasm = WasmMLP(widths, max_batch=64)
    wasm.set_weights({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return model, wasm


@pytest.mark.parametrize(
    "widths,batch",
    [
        ([64, 128, 10], 32),
        ([64, 10], 7),
        ([784, 200, 10], 64),
        ([5, 33, 17, 3], 1),
        # k past one cache block (KC 128) and columns past one panel (NC 256), ragged rows
        # (batch 13: no multiple of the 4-row tile) and ragged columns (37, 6: no multiple
        # of the 8-column tile or the 4-float vector)
        ([300, 301, 37, 6], 13),
        ([3, 4, 8, 2], 5),
    ],
)
def test_one_step_matches_pytorch_loss_gradients_and_weights(widths: list[int], batch: int):
    model, wasm = _pair(widths, seed=len(widths) * 100 + batch)
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], size=batch)
    lr, momentum, decay = 0.05, 0.9, 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
    for step in range(3):  # momentum is only exercised from the second step on
        logits = model(torch.as_tensor(x))
        loss = F.cross_entropy(logits, torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        fb = wasm.forward_backward(x, y)
        assert abs(fb.loss - float(loss.detach())) <= RTOL * abs(float(loss.detach())), step
        assert fb.correct == int((logits.argmax(1) == torch.as_tensor(y)).sum())
        grads = wasm.gradients()
        for name, p in model.named_parameters():
            assert p.grad is not None
            assert _rel(grads[name], p.grad.numpy()) <= RTOL, (step, name)
        opt.step()
        wasm.train_step(x, y, lr=lr, momentum=momentum, weight_decay=decay)
        weights = wasm.weights()
        for name, p in model.named_parameters():
            assert _rel(weights[name], p.detach().numpy()) <= RTOL, (step, name)


@pytest.mark.parametrize("widths,batch,rows", [([64, 128, 10], 32, 100), ([9, 13, 3], 4, 30)])
def test_an_epoch_in_few_calls_matches_the_pytorch_loop(
    widths: list[int], batch: int, rows: int
) -> None:
    model = MLP(MLPConfig(widths[0], tuple(widths[1:-1]), widths[-1]))
    torch.manual_seed(7)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    wasm = WasmMLP(widths, max_batch=batch, steps_per_call=2)  # several calls per epoch
    wasm.set_weights({k: v.detach().numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], size=rows)
    wasm.load_data(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for epoch in range(2):
        order = rng.permutation(rows)  # the last batch is short: rows % batch != 0
        loss_sum, correct = 0.0, 0
        for start in range(0, rows, batch):
            idx = torch.as_tensor(order[start : start + batch])
            logits = model(torch.as_tensor(x)[idx])
            loss = F.cross_entropy(logits, torch.as_tensor(y)[idx])
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == torch.as_tensor(y)[idx]).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
        got = wasm.train_epoch(order, batch_size=batch, lr=0.05, momentum=0.9, weight_decay=1e-3)
        assert got.correct == correct, epoch
        assert got.loss == pytest.approx(loss_sum / rows, rel=RTOL), epoch
    weights = wasm.weights()
    for name, p in model.named_parameters():
        assert _rel(weights[name], p.detach().numpy()) <= 10 * RTOL, name


def test_an_epoch_refuses_rows_outside_the_data() -> None:
    _, wasm = _pair([4, 3], seed=0)
    wasm.load_data(np.zeros((5, 4), np.float32), np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="loaded rows"):
        wasm.train_epoch(np.array([0, 5]), batch_size=2, lr=0.1)
    with pytest.raises(ValueError, match="at most 5"):
        wasm.train_epoch(np.zeros(6, np.int64), batch_size=2, lr=0.1)
    # The module checks too: an index past the data is refused there, not read.
    sb, (x_ptr, y_ptr, order_ptr, _) = wasm.sandbox, wasm._data or (0, 0, 0, 0)
    sb.write(order_ptr, np.array([0, 9], np.int32))
    args = (wasm.handle, x_ptr, y_ptr, 5, order_ptr, 2, 2, 0.1, 0.0, 0.0, 0.0, 0)
    assert sb.call("mlp_train_steps", *args) == -1.0


def test_fedprox_step_matches_pytorch() -> None:
    model, wasm = _pair([64, 32, 10], seed=3)
    anchor = {k: v.detach().numpy() + 0.01 for k, v in model.state_dict().items()}
    wasm.set_anchor(anchor)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 64)).astype(np.float32), rng.integers(0, 10, size=16)
    mu, lr = 0.5, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y))
        for name, p in model.named_parameters():
            loss = loss + mu / 2 * ((p - torch.as_tensor(anchor[name])) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        wasm.train_step(x, y, lr=lr, momentum=0.9, proximal_mu=mu)
    weights = wasm.weights()
    for name, p in model.named_parameters():
        assert _rel(weights[name], p.detach().numpy()) <= RTOL, name


def test_softmax_cross_entropy_is_stable_for_huge_logits() -> None:
    model, wasm = _pair([4, 3], seed=0)
    w = {"net.0.weight": np.eye(3, 4, dtype=np.float32) * 1e4, "net.0.bias": np.zeros(3, "f4")}
    wasm.set_weights(w)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in w.items()})
    x = np.array([[9.0, -3.0, 1.0, 0.0], [-5.0, 0.0, 7.0, 2.0]], dtype=np.float32)
    y = np.array([1, 2])
    loss = float(F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y)).detach())
    fb = wasm.forward_backward(x, y)
    assert np.isfinite(fb.loss) and abs(fb.loss - loss) <= RTOL * loss
    assert all(np.isfinite(g).all() for g in wasm.gradients().values())


@pytest.mark.skipif(
    shutil.which("clang") is None and not IN_CI,
    reason="no clang (scripts/ensure-wasm-toolchain.sh installs clang and lld)",
)
def test_committed_module_is_what_the_source_builds(tmp_path: Path) -> None:
    out = tmp_path / "kernels.wasm"
    subprocess.run([str(ROOT / "scripts" / "build-wasm.sh"), str(out)], check=True, timeout=120)
    assert out.read_bytes() == MODULE_PATH.read_bytes(), "run scripts/build-wasm.sh"
