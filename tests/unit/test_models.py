"""Every model of the registry builds from a name, runs forward, and is seedable."""

from __future__ import annotations

import pytest
import torch

from learning.models import MLP, ViT, build_model, model_names, resnet18


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (64,)),
        ("cnn", (1, 28, 28)),
        ("cnn", (3, 32, 32)),
        ("vit_tiny", (3, 32, 32)),
        ("resnet18", (3, 32, 32)),
        ("resnet50", (3, 32, 32)),
    ],
)
def test_every_registered_model_maps_a_batch_to_one_logit_per_class(
    name: str, shape: tuple[int, ...]
) -> None:
    model = build_model(name, num_classes=7, input_shape=shape, seed=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_the_registry_knows_the_five_models_and_refuses_others() -> None:
    assert model_names() == ["cnn", "mlp", "resnet18", "resnet50", "vit_tiny"]
    with pytest.raises(KeyError, match="unknown model 'gpt'"):
        build_model("gpt")
    with pytest.raises(TypeError, match="no field"):
        build_model("mlp", depth=3)


def test_the_digits_mlp_is_64_128_10_with_its_linears_in_layer_order() -> None:
    model = build_model("mlp", input_shape=(64,))
    assert isinstance(model, MLP)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "net.0.weight": (128, 64),
        "net.0.bias": (128,),
        "net.2.weight": (10, 128),
        "net.2.bias": (10,),
    }
    wide = build_model("mlp", input_shape=(40,), hidden=[32, 16])  # JSON lists are fine
    assert [m.out_features for m in wide.modules() if isinstance(m, torch.nn.Linear)] == [
        32,
        16,
        10,
    ]


def test_the_same_seed_gives_the_same_weights_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_model("cnn", seed=4), build_model("cnn", seed=4)
    assert torch.equal(before, torch.random.get_rng_state())
    assert _same(a, b) and not _same(a, build_model("cnn", seed=5))


def test_the_cnn_reshapes_flat_8x8_digits_to_images() -> None:
    model = build_model("cnn", input_shape=(64,), channels=(8, 16), seed=0)
    assert model(torch.rand(3, 64)).shape == (3, 10)


def test_the_tiny_vit_has_64_patches_and_pools_by_cls_token_or_mean() -> None:
    cls = build_model("vit_tiny", input_shape=(3, 32, 32), dim=64, depth=2, heads=4)
    mean = build_model("vit_tiny", input_shape=(3, 32, 32), pool="mean")
    assert isinstance(cls, ViT) and cls.pos_embed.shape == (1, 65, 64)
    assert mean.pos_embed.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="multiple of heads"):
        build_model("vit_tiny", dim=66, heads=4)


def test_a_resnet18_from_the_registry_is_the_cifar_resnet18_of_the_models_package() -> None:
    a = build_model("resnet18", input_shape=(3, 32, 32), seed=0)
    torch.manual_seed(0)
    assert _same(a, resnet18(num_classes=10, cifar_stem=True))
