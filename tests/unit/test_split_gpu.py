"""The edge engine on CUDA against the CPU: run with ``pytest -m gpu`` on a machine with a
GPU (deselected by default; skipped without CUDA). CI has no GPU: the engine's CPU path is
what tests/unit/test_split_session.py and the integration tests run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.split_helpers import MODEL
from workers.edge.engine import EdgeEngine
from workers.edge.task import build_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _steps(engine: EdgeEngine, steps: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(steps):
        groups = [rng.standard_normal((n, 32)).astype(np.float32) for n in (5, 11)]
        out = engine.forward(engine.stage(groups))
        grad = rng.standard_normal(out.shape).astype(np.float32)
        outs += [out, engine.backward(engine.stage([grad[:5], grad[5:]]))]
    return outs


@pytest.mark.parametrize("overlap", [True, False])
def test_the_cuda_engine_computes_what_the_cpu_engine_computes(overlap: bool) -> None:
    spec = {"model": MODEL, "train": {"lr": 0.1, "momentum": 0.9}, "edge": {"overlap": overlap}}
    cpu, _ = build_engine(spec, "cpu")
    gpu, _ = build_engine(spec, "cuda")
    for got, want in zip(_steps(gpu), _steps(cpu), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    t = gpu.timings()
    assert t.groups == 4 and t.copy_s > 0 and t.compute_s > 0


def test_bf16_autocast_on_cuda_stays_close_to_fp32() -> None:
    spec = {"model": MODEL, "train": {"lr": 0.1}, "edge": {"autocast": True}}
    cpu, _ = build_engine({**spec, "edge": {}}, "cpu")
    gpu, _ = build_engine(spec, "cuda")
    for got, want in zip(_steps(gpu, 1), _steps(cpu, 1), strict=True):
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
