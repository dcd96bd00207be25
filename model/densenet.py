"""DenseNet-BC for CIFAR.

Huang et al. 2017, "Densely Connected Convolutional Networks": bottleneck layers (B) and compression
0.5 at transitions (C), growth rate 32 and the ImageNet block configurations for 121/169/201/264, on a
CIFAR stem of one 3x3 conv (no BN, no max pool) so 32x32 images keep their resolution.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.init import init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its k new channels are appended to its input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        # The 1x1 conv caps the 3x3 conv's input at 4k channels however wide the block has grown.
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_features = self.conv1(F.relu(self.bn1(x)))
        new_features = self.conv2(F.relu(self.bn2(new_features)))
        return torch.cat([x, new_features], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2 between dense blocks: halves resolution and (compression 0.5) width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, block_config: tuple[int, ...], num_classes: int, growth_rate: int = 32,
                 compression: float = 0.5) -> None:
        super().__init__()
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        features: list[nn.Module] = []
        for index, num_layers in enumerate(block_config):
            for _ in range(num_layers):
                features.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            if index < len(block_config) - 1:
                out_channels = int(channels * compression)
                features.append(Transition(channels, out_channels))
                channels = out_channels
        self.features = nn.Sequential(*features)
        # The layers are pre-activation, so the last block's output still needs its BN-ReLU.
        self.bn = nn.BatchNorm2d(channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet121(num_classes: int) -> DenseNet:
    return DenseNet((6, 12, 24, 16), num_classes)


def densenet169(num_classes: int) -> DenseNet:
    return DenseNet((6, 12, 32, 32), num_classes)


def densenet201(num_classes: int) -> DenseNet:
    return DenseNet((6, 12, 48, 32), num_classes)


def densenet264(num_classes: int) -> DenseNet:
    return DenseNet((6, 12, 64, 48), num_classes)
