"""Split cuts, the fused loss, and split training equal to unsplit training (pure, CPU)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learning.models import build_model
from learning.split import (
    LocalEdge,
    fused_cross_entropy,
    sgd,
    split_model,
    train_split,
    unfused_cross_entropy,
)
from learning.train import train_local

MODELS = {
    "mlp": ({"hidden": (32, 24, 16)}, (64,)),
    "cnn": ({"channels": (4, 8), "hidden": 16}, (1, 8, 8)),
    "vit_tiny": ({"image_size": 8, "patch_size": 2, "dim": 16, "depth": 2, "heads": 2}, (1, 8, 8)),
}


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    cfg, shape = MODELS[name]
    return build_model(name, num_classes=10, input_shape=shape, seed=seed, **cfg)


def _data(name: str, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    shape = MODELS[name][1]
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 10, n)


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_three_parts_compose_to_the_model_and_share_its_parameters(name: str) -> None:
    model = _model(name)
    split = split_model(model)
    x = torch.as_tensor(_data(name)[0])
    assert torch.equal(split(x), model(x))
    owned = split.owner()
    assert set(owned) == set(model.state_dict())
    assert {"head", "body", "tail"} == set(owned.values())
    model_ids = {id(p) for p in model.parameters()}
    for part in ("head", "body", "tail"):
        assert {id(p) for p in split.part(part).parameters()} <= model_ids


def test_an_mlp_with_one_hidden_layer_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="two hidden layers"):
        split_model(build_model("mlp", hidden=(16,)))


def test_resnet_has_no_cut() -> None:
    with pytest.raises(ValueError, match="no split"):
        split_model(build_model("resnet18", input_shape=(3, 32, 32)))


def test_fused_cross_entropy_matches_torch_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(17, 10) * 30).requires_grad_(True)  # large logits: stability
    y = torch.randint(0, 10, (17,))
    ref = logits.detach().clone().requires_grad_(True)
    value, expected = fused_cross_entropy(logits, y), F.cross_entropy(ref, y)
    value.backward()
    expected.backward()
    assert torch.allclose(value, expected, rtol=1e-6)
    assert torch.allclose(logits.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_stays_finite_where_naive_softmax_overflows() -> None:
    logits = torch.tensor([[1000.0, 0.0, -1000.0]], requires_grad=True)
    value = fused_cross_entropy(logits, torch.tensor([2]))
    value.backward()
    assert torch.isfinite(value) and float(value.detach()) == pytest.approx(2000.0)
    assert torch.isfinite(logits.grad).all()
    assert torch.isfinite(unfused_cross_entropy(logits, torch.tensor([2])))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_split_training_gives_the_weights_of_unsplit_training(name: str, momentum: float) -> None:
    x, y = _data(name)
    reference = _model(name)
    train_args = {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": momentum, "seed": 7}
    train_local(reference, x, y, **train_args)

    model = _model(name)
    split = split_model(model)
    edge = LocalEdge(split.body, sgd(split.body.parameters(), lr=0.05, momentum=momentum))
    result = train_split(split, edge, x, y, **train_args)

    assert result.num_samples == len(y)
    for key, expected in reference.state_dict().items():
        assert max_relative_error(model.state_dict()[key], expected) <= 1e-5, key
    assert not torch.equal(model.state_dict()[key], _model(name).state_dict()[key])


def test_a_separate_edge_copy_of_the_body_trains_the_same_body() -> None:
    """The edge holds its own instance (built from the same seed), as over the bus."""
    x, y = _data("mlp")
    split = split_model(_model("mlp"))
    edge_body = copy.deepcopy(split.body)
    edge = LocalEdge(edge_body, sgd(edge_body.parameters(), lr=0.1))
    train_split(split, edge, x, y, epochs=1, batch_size=16, lr=0.1, seed=1)
    reference = _model("mlp")
    train_local(reference, x, y, epochs=1, batch_size=16, lr=0.1, seed=1)
    ref_split = split_model(reference)
    for got, want in zip(edge_body.parameters(), ref_split.body.parameters(), strict=True):
        assert max_relative_error(got.detach(), want.detach()) <= 1e-5
