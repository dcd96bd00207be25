"""The non-local block: every position of a feature map attends to every other.

Wang et al. 2018, "Non-local Neural Networks" (Fig. 2: the embedded Gaussian version, with phi and g
max-pooled 2x2 to cut the cost, as AlexHex7/Non-local_pytorch builds it). ResNet's ``non_local_after``
option inserts it between blocks.
"""
import torch
import torch.nn.functional as F
from torch import nn


class NonLocalBlock(nn.Module):
    """z = x + BN(W y), y = softmax(theta(x)^T phi(x)) g(x), at half the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = channels // 2
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.w = nn.Conv2d(inner, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def start_as_identity(self) -> None:
        """Zeroes the output BN, as Wang et al. 2018 do, so that the block adds nothing at first and can
        go into a network without disturbing what the rest of it computes."""
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        queries = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C/2)
        # Keys and values on a 2x2-pooled grid: a quarter of the pairs, still covering the whole image.
        keys = F.max_pool2d(self.phi(x), 2).flatten(2)  # (N, C/2, HW/4)
        values = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)  # (N, HW/4, C/2)
        attention = torch.softmax(queries @ keys, dim=-1)
        y = (attention @ values).transpose(1, 2).reshape(batch, -1, height, width)
        return x + self.bn(self.w(y))
