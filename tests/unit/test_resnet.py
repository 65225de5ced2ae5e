"""ResNets match torchvision's architectures parameter for parameter."""

from __future__ import annotations

import pytest
import torch

from learning.models import ResNet, ResNetConfig, resnet18, resnet50


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_with_an_imagenet_head_has_torchvisions_11_689_512_parameters() -> None:
    assert _params(resnet18(num_classes=1000)) == 11_689_512


def test_resnet50_with_an_imagenet_head_has_torchvisions_25_557_032_parameters() -> None:
    assert _params(resnet50(num_classes=1000)) == 25_557_032


def test_the_cifar_stem_is_one_3x3_stride_1_conv_without_maxpool() -> None:
    model = resnet18(num_classes=10, cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    # 11,689,512 - 7*7*3*64 + 3*3*3*64 - 1000*513 + 10*513
    assert _params(model) == 11_173_962


@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_a_cifar_batch_goes_through_forward_and_backward(build: type[ResNet]) -> None:
    torch.manual_seed(0)
    model = build(num_classes=10, cifar_stem=True)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert model.conv1.weight.grad is not None


def test_an_imagenet_stem_accepts_small_images_thanks_to_adaptive_pooling() -> None:
    model = resnet18(num_classes=1000).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_the_config_travels_with_the_model() -> None:
    model = resnet50(num_classes=7, cifar_stem=True)
    assert model.config == ResNetConfig("bottleneck", (3, 4, 6, 3), 7, True)
    assert ResNet(model.config).state_dict().keys() == model.state_dict().keys()
