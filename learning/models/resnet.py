"""ResNet-18 and ResNet-50 in plain torch.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016). The layer layout,
initialisation and parameter counts follow torchvision's ``resnet18``/``resnet50`` (v1.5:
the bottleneck strides in its 3x3 convolution), so weights and sizes compare one to one with
the paper's ResNet-18/50 measurements, without depending on torchvision.

``cifar_stem=True`` swaps the 7x7/stride-2 stem and its max-pool for one 3x3/stride-1
convolution: on 32x32 CIFAR images the ImageNet stem would shrink the feature map to 8x8
before the first residual stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

BlockKind = Literal["basic", "bottleneck"]


@dataclass(frozen=True)
class ResNetConfig:
    block: BlockKind = "basic"
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_classes: int = 1000
    cifar_stem: bool = False
    in_channels: int = 3
    width: int = 64


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + identity)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        # Stride on the 3x3 (torchvision's "v1.5"), not on the first 1x1 as in the paper.
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + identity)
        return out


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block = _BLOCKS[config.block]
        w = config.width
        if config.cifar_stem:
            self.conv1 = _conv3x3(config.in_channels, w)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(config.in_channels, w, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self._c_in = w
        self.layer1 = self._make_stage(block, w, config.layers[0], stride=1)
        self.layer2 = self._make_stage(block, w * 2, config.layers[1], stride=2)
        self.layer3 = self._make_stage(block, w * 4, config.layers[2], stride=2)
        self.layer4 = self._make_stage(block, w * 8, config.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w * 8 * block.expansion, config.num_classes)
        self._init_weights()

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], width: int, blocks: int, stride: int
    ) -> nn.Sequential:
        c_out = width * block.expansion
        downsample = None
        if stride != 1 or self._c_in != c_out:
            downsample = nn.Sequential(_conv1x1(self._c_in, c_out, stride), nn.BatchNorm2d(c_out))
        layers = [block(self._c_in, width, stride, downsample)]
        self._c_in = c_out
        layers += [block(c_out, width, 1, None) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's scheme, so freshly initialised weights (used by the codec benchmark)
        # have the same distribution as torchvision's untrained models.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return out


def resnet18(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    return ResNet(ResNetConfig("basic", (2, 2, 2, 2), num_classes, cifar_stem))


def resnet50(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    return ResNet(ResNetConfig("bottleneck", (3, 4, 6, 3), num_classes, cifar_stem))
