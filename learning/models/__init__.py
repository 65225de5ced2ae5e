from learning.models.cnn import CNN, CNNConfig
from learning.models.mlp import MLP, MLPConfig
from learning.models.registry import build_model, model_names
from learning.models.resnet import ResNet, ResNetConfig, resnet18, resnet50
from learning.models.vit import ViT, ViTConfig

__all__ = [
    "CNN",
    "MLP",
    "CNNConfig",
    "MLPConfig",
    "ResNet",
    "ResNetConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "model_names",
    "resnet18",
    "resnet50",
]
