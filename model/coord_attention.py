"""Coordinate Attention: a channel gate that keeps where along each axis a feature sits.

Hou et al. 2021, "Coordinate Attention for Efficient Mobile Network Design" (Fig. 2c; the official
houqb/CoordAttention with reduction 32). ResNet's ``attention="ca"`` option puts it where SE sits.
"""
import torch
import torch.nn.functional as F
from torch import nn


class CoordinateAttention(nn.Module):
    """Pools along width and along height, encodes both with one shared 1x1 conv, and turns each half
    back into a per-row and a per-column gate; the product of the two rescales the input."""

    def __init__(self, channels: int, reduction: int = 32) -> None:
        super().__init__()
        # At least 8 channels in the middle, so that the narrow early stages still get a useful encoding.
        hidden = max(8, channels // reduction)
        self.encode = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.gate_h = nn.Conv2d(hidden, channels, 1)
        self.gate_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        # Both pooled maps as columns (N, C, H + W, 1), so one conv encodes them together.
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
        encoded = F.hardswish(self.bn(self.encode(pooled)))
        along_h, along_w = torch.split(encoded, [height, width], 2)
        gate_h = torch.sigmoid(self.gate_h(along_h))
        gate_w = torch.sigmoid(self.gate_w(along_w.transpose(2, 3)))
        return x * gate_h * gate_w
