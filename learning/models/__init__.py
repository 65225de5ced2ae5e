from learning.models.resnet import ResNet, ResNetConfig, resnet18, resnet50

__all__ = ["ResNet", "ResNetConfig", "resnet18", "resnet50"]
