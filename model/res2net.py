"""Res2Net-50 and Res2NeXt-29: a bottleneck whose 3x3 conv is a hierarchy of smaller ones.

Gao et al. 2021, "Res2Net: A New Multi-scale Backbone Architecture" (TPAMI; Fig. 2, and the CIFAR-100
table for Res2NeXt-29 6c x 24w x 4s), as the official Res2Net/Res2Net-PretrainedModels res2net.py
(Bottle2neck) and res2next.py (Bottle2neckX) build it; one block serves both, cardinality 1 being
Res2Net's. Res2Net-50 sits on our CIFAR ResNet, Res2NeXt-29 on our ResNeXt-29. The paper gives 24.3M
parameters for Res2NeXt-29; the official block gives 23.6M, and we follow the block.
"""
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.resnet import ResNet, add_attention, shortcut
from model.resnext import ResNeXt29


class Res2Shape(NamedTuple):
    """The widths of a Res2 block: channels per group at 64 planes, groups (scales), and cardinality."""

    base_width: int = 26
    scale: int = 4
    cardinality: int = 1


class Res2Block(nn.Module):
    """1x1 conv to ``scale`` groups of channels; each group but the last gets a 3x3 conv, after adding
    the previous group's output to it, so that the outputs see ever larger fields; the last group is
    kept as it is; then the 1x1 conv to 4 x planes. The first block of a stage adds nothing and pools
    its last group, with the stride, instead (the official "stage" type)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, attention: Optional[str] = None,
                 shape: Res2Shape = Res2Shape()) -> None:
        super().__init__()
        base_width, scale, cardinality = shape
        width = cardinality * (planes * base_width // 64)  # of each group
        out_channels = planes * self.expansion
        self.width, self.stride = width, stride
        self.first = stride != 1 or in_channels != out_channels
        self.conv1 = nn.Conv2d(in_channels, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
            for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attention_name = add_attention(self, attention, out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(F.relu(self.bn1(self.conv1(x))), self.width, 1)
        outputs = []
        for group, conv, bn in zip(groups, self.convs, self.bns):
            if outputs and not self.first:
                group = group + outputs[-1]
            outputs.append(F.relu(bn(conv(group))))
        last = groups[-1]
        if self.first:
            last = F.avg_pool2d(last, 3, stride=self.stride, padding=1)
        out = self.bn3(self.conv3(torch.cat(outputs + [last], 1)))
        out = getattr(self, self.attention_name)(out)
        return F.relu(out + self.shortcut(x))


def res2net50(num_classes: int) -> ResNet:
    return ResNet(Res2Block, [3, 4, 6, 3], num_classes)


def res2next29_6c24w4s(num_classes: int) -> ResNeXt29:
    return ResNeXt29(partial(Res2Block, shape=Res2Shape(base_width=24, scale=4, cardinality=6)), num_classes)
