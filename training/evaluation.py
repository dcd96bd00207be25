"""Measuring a network on a set of batches, and the two commands that use a trained one: --eval-only (test
accuracy, per class and a confusion matrix, into eval.json) and --predict (the top-5 classes of image files).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import plot
from cifar.batches import BatchOptions, EvalBatches
from cifar.dataset_files import DataError
from core.errors import RunFailed
from runfolder import declarations, store
from runfolder.declarations import CONFUSION_FILE, EVAL_FILE, Evaluation
from serving import trained_net
from training.devices import accumulator_dtype, autocast, pick_device, resolve_amp


class Rates(NamedTuple):
    """Top-1, top-5 and mean loss of a set of images."""

    acc: float
    top5: float
    loss: float


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


def rates(totals: torch.Tensor) -> Rates:
    """evaluate()'s totals as rates."""
    loss, top1, top5, count = totals.tolist()
    return Rates(acc=top1 / count, top5=top5 / count, loss=loss / count)


def checkpoint_path_of(args: argparse.Namespace, dataset: str) -> Path:
    """--checkpoint, or the run's best.pt."""
    if args.checkpoint:
        return Path(args.checkpoint)
    return store.run_folder(args.results_dir, dataset, args.model, args.tag) / declarations.BEST_CHECKPOINT


def evaluate_checkpoint(args: argparse.Namespace, dataset: str, load_dataset, num_classes: int) -> int:
    """--eval-only: the test set through a best.pt, printed and written beside it."""
    checkpoint_path = checkpoint_path_of(args, dataset)
    out_dir = checkpoint_path.parent
    store.refuse_if_in_use(out_dir)
    trained = trained_net.load_trained(checkpoint_path, args.model, num_classes)
    device = pick_device(args.device, 0)
    _, amp_dtype = resolve_amp(args.amp, device)
    net = trained.net.to(device)  # the batches below normalize, as in training
    data = load_dataset(args.data_dir)
    mean, std = trained.statistics
    batches = EvalBatches(data.test_images, data.test_labels, 500, BatchOptions(mean, std, device))
    totals, confusion = evaluate(net, batches, amp_dtype, tta=args.tta, num_classes=num_classes)
    result, confusion = rates(totals), confusion.cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp_min(1)).tolist()
    print(f"{args.model} {checkpoint_path} on the {dataset} test set ({int(totals[3])} images"
          f"{', with mirror TTA' if args.tta else ''}):")
    print(f"Top-1 accuracy: {result.acc:.4f}, Top-5 accuracy: {result.top5:.4f}, Loss: {result.loss:.4f}")
    width = max(len(name) for name in data.classes)
    for name, accuracy in zip(data.classes, per_class):
        print(f"  {name:<{width}}  {accuracy:.4f}")
    evaluation = Evaluation(
        model=args.model, dataset=dataset, checkpoint=str(checkpoint_path), checkpoint_epoch=trained.epoch,
        tta=args.tta, test_acc=result.acc, test_top5=result.top5, test_loss=result.loss,
        images=int(totals[3]), per_class=dict(zip(data.classes, per_class)),
        confusion_matrix=confusion.tolist())
    write_evaluation(out_dir, evaluation, confusion, data.classes)
    print(f"Wrote {out_dir / EVAL_FILE} and {out_dir / CONFUSION_FILE}")
    return 0


def write_evaluation(out_dir: Path, evaluation: Evaluation, confusion: torch.Tensor, classes: list[str]) -> None:
    """eval.json and confusion_matrix.png, under the folder's lock."""
    lock = store.lock_run_folder(out_dir)
    try:
        store.write_text(out_dir / EVAL_FILE, declarations.json_text(evaluation))
        plot.plot_confusion_matrix(confusion.numpy(), classes, out_dir / CONFUSION_FILE,
                                   f"{evaluation.model} on the {plot.pretty_dataset(evaluation.dataset)} "
                                   f"test set{' (mirror TTA)' if evaluation.tta else ''}")
    except store.WriteFailed as err:
        raise RunFailed(f"{err}; {evaluation.checkpoint} is untouched; free space, then evaluate "
                        "again") from None
    finally:
        lock.close()


def predict_images(args: argparse.Namespace, dataset: str, load_dataset, num_classes: int) -> int:
    """--predict: the top-5 classes of each image file by a trained network; writes nothing."""
    from serving import predict  # here, not at the top: torchvision's image code costs every other command 2 s to load
    trained = trained_net.load_trained(checkpoint_path_of(args, dataset), args.model, num_classes)
    class_names = trained.classes
    if class_names is None:  # a best.pt from before checkpoints carried the class names
        try:
            class_names = load_dataset(args.data_dir, download=False).classes
        except DataError:
            class_names = None  # predict names them "class 0", "class 1", ...
    device = pick_device(args.device, 0)
    for line in predict.format_predictions(
            predict.predict_files(trained, args.predict, device, class_names)):
        print(line)
    return 0
