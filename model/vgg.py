"""VGG with batch normalization, CIFAR form.

Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(configurations A, B, D, E of Table 1: VGG-11/13/16/19), with BN after every conv (Ioffe & Szegedy 2015)
and, for 32x32 images, the five max pools taking the map to 1x1 and one linear layer in place of the
three 4096-wide ones, as kuangliu/pytorch-cifar does.
"""
import torch
from torch import nn

from model.init import init_weights

# Output channels of each 3x3 conv, "M" for a 2x2 max pool.
CONFIGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config: str, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in CONFIGS[config]:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                # The conv keeps its bias, as in the original VGG, although the BN after it cancels it.
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                in_channels = width
        self.features = nn.Sequential(*layers)
        # 1x1 already for 32x32 images; lets larger ones through to the fixed-size head.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11(num_classes: int) -> VGG:
    return VGG("A", num_classes)


def vgg13(num_classes: int) -> VGG:
    return VGG("B", num_classes)


def vgg16(num_classes: int) -> VGG:
    return VGG("D", num_classes)


def vgg19(num_classes: int) -> VGG:
    return VGG("E", num_classes)
