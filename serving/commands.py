"""The two commands that use a trained network instead of training one: --eval-only (test accuracy, per class and
a confusion matrix, into eval.json and confusion_matrix.png beside the checkpoint) and --predict (the top-5 classes
of image files, printed). train.py dispatches to them; their network is measured by training/evaluation.py's
evaluate(), as the loop's is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cifar.batches import BatchOptions, EvalBatches
from cifar.dataset_files import CifarData, DataError
from core.errors import RunFailed
from reports.figures import plot_confusion_matrix
from reports.summary import pretty_dataset
from runfolder import declarations, lock, store
from runfolder.declarations import CONFUSION_FILE, EVAL_FILE, Evaluation
from serving import trained_net
from training.devices import pick_device, resolve_amp
from training.evaluation import CALIBRATION_BINS, EvalResult, calibration, evaluate
from training.flags import CommandLine


def checkpoint_path_of(line: CommandLine) -> Path:
    """--checkpoint, or the run's best.pt."""
    if line.commands.checkpoint:
        return Path(line.commands.checkpoint)
    settings = line.settings
    folder = store.run_folder(settings.results_dir, line.dataset, line.recipe.model, settings.tag)
    return folder / declarations.BEST_CHECKPOINT


def evaluate_checkpoint(line: CommandLine, load_dataset: Callable[..., CifarData], num_classes: int) -> int:
    """--eval-only: the test set through a best.pt, printed and written beside it."""
    model, dataset, settings, tta = line.recipe.model, line.dataset, line.settings, line.commands.tta
    checkpoint_path = checkpoint_path_of(line)
    out_dir = checkpoint_path.parent
    lock.refuse_if_in_use(out_dir)
    trained = trained_net.load_trained(checkpoint_path, model, num_classes)
    device = pick_device(settings.device, 0)
    _, amp_dtype = resolve_amp(settings.amp, device)
    net = trained.net.to(device)  # the batches below normalize, as in training
    data = load_dataset(settings.data_dir)
    mean, std = trained.statistics
    batches = EvalBatches(data.test_images, data.test_labels, 500, BatchOptions(mean, std, device))
    totals, confusion, bin_sums = evaluate(net, batches, amp_dtype, tta=tta, num_classes=num_classes,
                                           calibrate=True)
    result, confusion, calibrated = EvalResult.from_totals(totals), confusion.cpu(), calibration(*bin_sums)
    per_class = (confusion.diag() / confusion.sum(1).clamp_min(1)).tolist()
    print(f"{model} {checkpoint_path} on the {dataset} test set ({int(totals[3])} images"
          f"{', with mirror TTA' if tta else ''}):")
    print(f"Top-1 accuracy: {result.acc:.4f}, Top-5 accuracy: {result.top5:.4f}, Loss: {result.loss:.4f}")
    print(f"ECE ({CALIBRATION_BINS} bins): {calibrated.ece:.4f}")
    width = max(len(name) for name in data.classes)
    for name, accuracy in zip(data.classes, per_class):
        print(f"  {name:<{width}}  {accuracy:.4f}")
    evaluation = Evaluation(
        model=model, dataset=dataset, checkpoint=str(checkpoint_path), checkpoint_epoch=trained.epoch,
        tta=tta, test_acc=result.acc, test_top5=result.top5, test_loss=result.loss,
        images=int(totals[3]), per_class=dict(zip(data.classes, per_class)),
        confusion_matrix=confusion.tolist(), ece=calibrated.ece, calibration_bins=calibrated.bins)
    write_evaluation(out_dir, evaluation, confusion, data.classes)
    print(f"Wrote {out_dir / EVAL_FILE} and {out_dir / CONFUSION_FILE}")
    return 0


def write_evaluation(out_dir: Path, evaluation: Evaluation, confusion: torch.Tensor, classes: list[str]) -> None:
    """eval.json and confusion_matrix.png, under the folder's lock."""
    held = lock.lock_run_folder(out_dir)
    try:
        store.write_text(out_dir / EVAL_FILE, declarations.json_text(evaluation))
        plot_confusion_matrix(confusion.numpy(), classes, out_dir / CONFUSION_FILE,
                              f"{evaluation.model} on the {pretty_dataset(evaluation.dataset)} "
                              f"test set{' (mirror TTA)' if evaluation.tta else ''}")
    except store.WriteFailed as err:
        raise RunFailed(f"{err}; {evaluation.checkpoint} is untouched; free space, then evaluate "
                        "again") from None
    finally:
        held.close()


def predict_images(line: CommandLine, load_dataset: Callable[..., CifarData], num_classes: int) -> int:
    """--predict: the top-5 classes of each image file by a trained network; writes nothing."""
    from serving import predict  # here, not at the top: torchvision's image code costs every other command 2 s to load
    trained = trained_net.load_trained(checkpoint_path_of(line), line.recipe.model, num_classes)
    class_names = trained.classes
    if class_names is None:  # a best.pt from before checkpoints carried the class names
        try:
            class_names = load_dataset(line.settings.data_dir, download=False).classes
        except DataError:
            class_names = None  # predict names them "class 0", "class 1", ...
    device = pick_device(line.settings.device, 0)
    for printed in predict.format_predictions(
            predict.predict_files(trained, line.commands.predict, device, class_names)):
        print(printed)
    return 0
