"""SCNet-50/101: ResNet bottlenecks in which half the channels go through a self-calibrated conv.

Liu et al. 2020, "Improving Convolutional Networks with Self-Calibrated Convolutions" (Fig. 2, as the
official MCG-NKU/SCNet scnet.py builds it: pooling rate 4, no deep stem), on our CIFAR ResNet.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.resnet import ResNet, add_attention, shortcut


def conv3x3_bn(channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(channels))


class SelfCalibratedConv(nn.Module):
    """A 3x3 conv (k3) gated by what a 3x3 conv (k2) sees on a 4x coarser copy of the input, then a 3x3
    conv with the stride (k4): each position is calibrated by a wider context than its own 3x3 field."""

    def __init__(self, channels: int, stride: int, pooling: int = 4) -> None:
        super().__init__()
        self.pooling = pooling
        self.k2 = conv3x3_bn(channels)
        self.k3 = conv3x3_bn(channels)
        self.k4 = conv3x3_bn(channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.k2(F.avg_pool2d(x, self.pooling))
        gate = torch.sigmoid(x + F.interpolate(context, x.shape[2:]))
        return self.k4(self.k3(x) * gate)


class SCBottleneck(nn.Module):
    """Two 1x1 convs to planes/2 each: one half through a plain 3x3 conv (k1), the other through the
    self-calibrated conv; concatenated, then the 1x1 conv to 4 x planes."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 attention: Optional[str] = None) -> None:
        super().__init__()
        half = planes // 2
        out_channels = planes * self.expansion
        self.conv1_a = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn1_a = nn.BatchNorm2d(half)
        self.k1 = conv3x3_bn(half, stride)
        self.conv1_b = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn1_b = nn.BatchNorm2d(half)
        self.scconv = SelfCalibratedConv(half, stride)
        self.conv3 = nn.Conv2d(2 * half, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attention_name = add_attention(self, attention, out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_a = F.relu(self.k1(F.relu(self.bn1_a(self.conv1_a(x)))))
        out_b = F.relu(self.scconv(F.relu(self.bn1_b(self.conv1_b(x)))))
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], 1)))
        out = getattr(self, self.attention_name)(out)
        return F.relu(out + self.shortcut(x))


def scnet50(num_classes: int) -> ResNet:
    return ResNet(SCBottleneck, [3, 4, 6, 3], num_classes)


def scnet101(num_classes: int) -> ResNet:
    return ResNet(SCBottleneck, [3, 4, 23, 3], num_classes)
