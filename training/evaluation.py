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


CALIBRATION_BINS = 15  # equal-width bins of the top-1 confidence, as Guo et al. 2017 (arXiv:1706.04599)


class Calibration(NamedTuple):
    """Expected calibration error and, per bin, its edges, image count, accuracy and mean confidence
    (accuracy and confidence None where the bin is empty)."""

    ece: float
    bins: list[dict]


def calibration(bin_counts, bin_correct, bin_confidence) -> Calibration:
    """ECE = sum over bins of (images in the bin / all images) * |bin accuracy - bin mean confidence|, from the
    per-bin count, correct count and summed confidence."""
    counts, correct, confidence = (torch.as_tensor(x, dtype=torch.float64).cpu().tolist()
                                   for x in (bin_counts, bin_correct, bin_confidence))
    total, width, ece, bins = sum(counts), 1 / len(counts), 0.0, []
    for index, (count, hits, summed) in enumerate(zip(counts, correct, confidence)):
        accuracy = hits / count if count else None
        mean_confidence = summed / count if count else None
        if count:
            ece += count / total * abs(accuracy - mean_confidence)
        bins.append({"low": index * width, "high": (index + 1) * width, "count": int(count),
                     "accuracy": accuracy, "confidence": mean_confidence})
    return Calibration(ece=ece, bins=bins)


def bin_sums(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> torch.Tensor:
    """(3, bins): per bin of the top-1 probability, the count, correct count and summed confidence; a
    confidence of exactly 1.0 goes into the last bin."""
    confidence, predicted = probs.max(1)
    index = (confidence * bins).long().clamp(0, bins - 1)
    rows = torch.stack([torch.ones_like(confidence), (predicted == labels).float(), confidence])
    dtype = accumulator_dtype(probs.device)
    return torch.zeros(3, bins, device=probs.device, dtype=dtype).index_add_(1, index, rows.to(dtype))


@torch.no_grad()
def evaluate(net: nn.Module, batches, amp_dtype, tta: bool = False, num_classes: int = 0,
             calibrate: bool = False):
    """Summed loss, top-1 and top-5 hits and count, kept on the device; optionally a confusion matrix, and with
    calibrate a third result: bin_sums() of the whole set (for calibration())."""
    net.eval()
    device = batches.device
    totals = torch.zeros(4, device=device, dtype=accumulator_dtype(device))
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.int64)
    calibration_sums = torch.zeros(3, CALIBRATION_BINS, device=device, dtype=accumulator_dtype(device))
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
        if calibrate:  # with tta, logits are the averaged probabilities' logs, so this is their softmax
            calibration_sums += bin_sums(logits.softmax(1), labels)
    if calibrate:
        return totals, confusion, calibration_sums
    return totals, confusion
