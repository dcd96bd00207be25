"""Measuring a network on a set of batches: the loop's validation and end-of-run tests, and --eval-only's test
of a trained network (serving/commands.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from training.devices import accumulator_dtype, autocast


class EvalResult(NamedTuple):
    """Top-1 and top-5 accuracy and mean loss of a set of images."""

    acc: float
    top5: float
    loss: float

    @classmethod
    def from_totals(cls, totals: torch.Tensor) -> EvalResult:
        """From evaluate()'s totals (summed loss, top-1 hits, top-5 hits, count)."""
        loss, top1, top5, count = totals.tolist()
        return cls(acc=top1 / count, top5=top5 / count, loss=loss / count)


@torch.no_grad()
def evaluate(net: nn.Module, batches, amp_dtype, tta: bool = False, num_classes: int = 0):
    """Summed loss, top-1 and top-5 hits and count, kept on the device; optionally a confusion matrix."""
    net.eval()
    device = batches.device
    totals = torch.zeros(4, device=device, dtype=accumulator_dtype(device))
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.int64)
    for inputs, labels in batches:
        with autocast(device, amp_dtype):
            logits = net(inputs).float()
            if tta:
                probs = (logits.softmax(1) + net(inputs.flip(3)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()  # so the loss below is that of the averaged prediction
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (top5[:, 0] == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        totals[3] += labels.numel()
        if num_classes:
            confusion += torch.bincount(labels * num_classes + top5[:, 0],
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    return totals, confusion
