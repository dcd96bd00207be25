"""ResNeXt-29 for CIFAR, and the skeleton SKNet-29 and Res2NeXt-29 share.

Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks" (Sec. 5.3, the CIFAR
networks; facebookresearch/ResNeXt resnext.lua): a 3x3 stem, three stages of three bottleneck blocks with
outputs 256/512/1024 and strides 1/2/2, global average pool, one linear layer. "8x64d" names the
cardinality (8 groups) and the width of each group in the first stage (64); the width doubles with each
stage.
"""
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.init import init_weights
from model.resnet import shortcut

# (in_channels, planes, stride) -> a block whose output has 4 x planes channels.
BlockFactory = Callable[[int, int, int], nn.Module]


class GroupedConv(nn.Module):
    """3x3 conv in ``groups`` groups, BN, ReLU: the aggregated transformation (Xie et al. 2017, Fig. 3c)."""

    def __init__(self, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResNeXtBlock(nn.Module):
    """1x1 conv to the inner width, a 3x3 unit at that width (with the stride), 1x1 conv to 4 x planes.
    The unit, (channels, stride) -> module, is ResNeXt's grouped conv or SKNet's selective kernel."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, width: int,
                 unit: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        # ``width`` is the inner width of the first stage (planes 64); it grows with planes after that.
        inner = width * planes // 64
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.unit = unit(inner, stride)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt29(nn.Module):
    def __init__(self, block: BlockFactory, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        stages = []
        for planes, stride in zip((64, 128, 256), (1, 2, 2)):
            stage = []
            for block_stride in [stride] + [1, 1]:
                stage.append(block(in_channels, planes, block_stride))
                in_channels = 4 * planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext29(cardinality: int, group_width: int, num_classes: int) -> ResNeXt29:
    unit = partial(GroupedConv, groups=cardinality)
    return ResNeXt29(partial(ResNeXtBlock, width=cardinality * group_width, unit=unit), num_classes)


def resnext29_8x64d(num_classes: int) -> ResNeXt29:
    return resnext29(8, 64, num_classes)


def resnext29_16x64d(num_classes: int) -> ResNeXt29:
    return resnext29(16, 64, num_classes)


def resnext29_32x4d(num_classes: int) -> ResNeXt29:
    return resnext29(32, 4, num_classes)
