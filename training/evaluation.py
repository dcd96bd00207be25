"""Measuring a network on a set of batches: the loop's validation, and the test report of a trained network
(eval.json, confusion_matrix.png, mistakes.png) that the end of a run and --eval-only (serving/commands.py) write.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from reports.figures import plot_confusion_matrix, plot_mistakes
from reports.summary import pretty_dataset
from runfolder import declarations, store
from runfolder.declarations import CONFUSION_FILE, EVAL_FILE, MISTAKES_FILE, Evaluation
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


MISTAKES = 16  # the most confident mistakes a test report keeps


def most_confident_mistakes(kept: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, start: int,
                            count: int = MISTAKES) -> torch.Tensor:
    """kept (3, <= count: confidence, image index, predicted class, by falling confidence) updated with a batch
    whose first image is image `start` of the set; on the device, without a host sync. A right answer counts as
    confidence -1, so it is kept only while there are fewer mistakes than `count`, and dropped at the end."""
    confidence, predicted = probs.max(1)
    wrong = torch.where(predicted != labels, confidence.to(kept.dtype), -1.0)
    index = torch.arange(start, start + len(labels), device=kept.device, dtype=kept.dtype)
    candidates = torch.cat([kept, torch.stack([wrong, index, predicted.to(kept.dtype)])], dim=1)
    order = candidates[0].topk(min(count, candidates.shape[1])).indices
    return candidates[:, order]


class TestDetails(NamedTuple):
    """What evaluate(..., details=True) measures besides the totals, all on the device."""

    confusion: torch.Tensor  # (classes, classes) counts, rows the true class
    calibration_sums: torch.Tensor  # bin_sums() of the whole set
    mistakes: torch.Tensor  # most_confident_mistakes() of the whole set


@torch.no_grad()
def evaluate(net: nn.Module, batches, amp_dtype, tta: bool = False, num_classes: int = 0,
             details: bool = False):
    """Summed loss, top-1 and top-5 hits and count, kept on the device, and a confusion matrix (empty without
    num_classes); with details (a test report, on one process) TestDetails instead of the confusion matrix."""
    net.eval()
    device = batches.device
    totals = torch.zeros(4, device=device, dtype=accumulator_dtype(device))
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.int64)
    calibration_sums = torch.zeros(3, CALIBRATION_BINS, device=device, dtype=accumulator_dtype(device))
    mistakes, seen = torch.zeros(3, 0, device=device, dtype=accumulator_dtype(device)), 0
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
        if details:  # with tta, logits are the averaged probabilities' logs, so this is their softmax
            probs = logits.softmax(1)
            calibration_sums += bin_sums(probs, labels)
            mistakes = most_confident_mistakes(mistakes, probs, labels, seen)
            seen += len(labels)
    if details:
        return totals, TestDetails(confusion, calibration_sums, mistakes)
    return totals, confusion


class TestSet(NamedTuple):
    """A test set as a test report names it: its dataset, batches, images (uint8 N x 3 x 32 x 32, in the batches'
    order), class names and, for CIFAR-100, each class's superclass."""

    dataset: str
    batches: object  # cifar.batches.EvalBatches
    images: torch.Tensor
    classes: list[str]
    superclasses: dict[str, str] | None


class Weights(NamedTuple):
    """The trained network a test report is of, as eval.json names it."""

    model: str
    checkpoint: Path
    epoch: int | None


def test_report(net: nn.Module, weights: Weights, test_set: TestSet, amp_dtype, tta: bool = False) -> Evaluation:
    """eval.json's record of a trained network on a test set: accuracy, per class, confusion, calibration and the
    most confident mistakes."""
    classes = test_set.classes
    totals, measured = evaluate(net, test_set.batches, amp_dtype, tta=tta, num_classes=len(classes), details=True)
    result, confusion = EvalResult.from_totals(totals), measured.confusion.cpu()
    calibrated = calibration(*measured.calibration_sums)
    per_class = (confusion.diag() / confusion.sum(1).clamp_min(1)).tolist()
    kept = measured.mistakes[:, measured.mistakes[0] >= 0]  # right answers, kept while mistakes were few, dropped
    true_labels = test_set.batches.labels[kept[1].long()].tolist()
    mistakes = [{"index": int(index), "true": classes[true], "predicted": classes[int(predicted)],
                 "confidence": confidence}
                for (confidence, index, predicted), true in zip(kept.T.tolist(), true_labels)]
    return Evaluation(
        model=weights.model, dataset=test_set.dataset, checkpoint=str(weights.checkpoint),
        checkpoint_epoch=weights.epoch, tta=tta, test_acc=result.acc, test_top5=result.top5,
        test_loss=result.loss, images=int(totals[3]), per_class=dict(zip(classes, per_class)),
        confusion_matrix=confusion.tolist(), ece=calibrated.ece, calibration_bins=calibrated.bins,
        mistakes=mistakes, superclasses=test_set.superclasses)


def write_test_report(out_dir: Path, evaluation: Evaluation, images: torch.Tensor) -> None:
    """eval.json, confusion_matrix.png and mistakes.png (thumbnails of `images`, the test set's uint8 images, at
    the mistakes' indices) into a run folder; store.WriteFailed when a file cannot be written. The caller holds
    the folder's lock."""
    classes = list(evaluation.per_class)
    store.write_text(out_dir / EVAL_FILE, declarations.json_text(evaluation))
    title = f"{evaluation.model} on the {pretty_dataset(evaluation.dataset)} test set"
    tta = " (mirror TTA)" if evaluation.tta else ""
    plot_confusion_matrix(evaluation.confusion_matrix, classes, out_dir / CONFUSION_FILE, title + tta)
    thumbnails = [images[item["index"]].permute(1, 2, 0).numpy() for item in evaluation.mistakes]
    plot_mistakes(evaluation.mistakes, thumbnails, out_dir / MISTAKES_FILE, "Most confident mistakes: " + title + tta)
