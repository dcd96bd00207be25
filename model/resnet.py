"""ResNet for CIFAR, with optional attention in the blocks and optional non-local blocks between them.

He et al. 2016, "Deep Residual Learning for Image Recognition" (BasicBlock, Bottleneck, projection
shortcuts); Hu et al. 2018, "Squeeze-and-Excitation Networks" and Hou et al. 2021, "Coordinate Attention
for Efficient Mobile Network Design" (the ``attention`` option of the blocks: "se" or "ca"); Wang et al.
2018, "Non-local Neural Networks" (the ``non_local_after`` option of ResNet).
CIFAR stem: one 3x3 conv with stride 1 and no max pool, because 32x32 images cannot afford the 4x
ImageNet downsampling.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.coord_attention import CoordinateAttention
from model.init import init_weights
from model.nonlocal_block import NonLocalBlock


class SqueezeExcite(nn.Module):
    """Rescales each channel by a gate computed from the whole feature map (Hu et al. 2018, Fig. 3)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.reduce = nn.Linear(channels, channels // reduction)
        self.expand = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1).flatten(1)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(gate))))
        return x * gate[:, :, None, None]


# What the ``attention`` option of a block puts on its residual branch.
ATTENTION: dict[str, type[nn.Module]] = {"se": SqueezeExcite, "ca": CoordinateAttention}


def add_attention(block: nn.Module, kind: Optional[str], channels: int) -> str:
    """Gives ``block`` the attention module ``kind`` (None, "se" or "ca") for a residual branch of
    ``channels`` channels and returns the attribute it sits under. The attribute is named after the kind
    so that state_dict keys say what they hold ("layer1.0.se.reduce.weight"); without attention it is an
    Identity under "se", the name every block had before CA joined, so checkpoints keep loading."""
    if kind is not None and kind not in ATTENTION:
        raise ValueError(f"unknown attention {kind!r}; choose None or one of: {', '.join(ATTENTION)}")
    name = kind or "se"
    block.add_module(name, ATTENTION[kind](channels) if kind else nn.Identity())
    return name


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes match, else the 1x1 conv + BN projection (option B of He et al. 2016)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 attention: Optional[str] = None) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Attention sits on the residual branch, before the addition (Hu et al. 2018, Fig. 3).
        self.attention_name = add_attention(self, attention, out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = getattr(self, self.attention_name)(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); used by ResNet-50/101/152. The stride is on the 3x3 conv, as
    in torchvision ("ResNet v1.5"), which keeps the 1x1 conv from skipping three quarters of the input."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 attention: Optional[str] = None) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attention_name = add_attention(self, attention, out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = getattr(self, self.attention_name)(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


# BasicBlock, Bottleneck or another bottleneck (Res2Net's, SCNet's): a class with an ``expansion`` that
# takes (in_channels, planes, stride, attention).
Block = type[nn.Module]


class ResNet(nn.Module):
    """``non_local_after`` lists (stage, block) pairs, both counted from 1, after which a non-local block
    is inserted into that stage."""

    def __init__(self, block: Block, num_blocks: list[int], num_classes: int,
                 attention: Optional[str] = None, non_local_after: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        stages = []
        for stage_number, planes, blocks, stride in zip(
                (1, 2, 3, 4), (64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            # Only the first block of a stage changes resolution or width.
            stage: list[nn.Module] = []
            for block_number, block_stride in enumerate([stride] + [1] * (blocks - 1), start=1):
                stage.append(block(in_channels, planes, block_stride, attention))
                in_channels = planes * block.expansion
                if (stage_number, block_number) in non_local_after:
                    stage.append(NonLocalBlock(in_channels))
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)
        for module in self.modules():
            if isinstance(module, NonLocalBlock):
                module.start_as_identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet101(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes)


def resnet152(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes)


def se_resnet18(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, attention="se")


def se_resnet34(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, attention="se")


def se_resnet50(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, attention="se")


def se_resnet101(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, attention="se")


def se_resnet152(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, attention="se")


def ca_resnet18(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, attention="ca")


def ca_resnet50(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, attention="ca")


# Wang et al. 2018's five-block ResNet-50 has a non-local block after every other block of its second and
# third stages (res3 and res4); ResNet-18, by the same rule, one in each of them.
def nl_resnet18(num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, non_local_after=[(2, 2), (3, 2)])


def nl_resnet50(num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes,
                  non_local_after=[(2, 2), (2, 4), (3, 2), (3, 4), (3, 6)])
