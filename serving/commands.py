"""The two commands that use a trained network instead of training one: --eval-only (test accuracy, per class,
calibration and the most confident mistakes, into eval.json, confusion_matrix.png and mistakes.png beside the
checkpoint, as the end of a run writes them) and --predict (the top-5 classes of image files, printed). train.py
dispatches to them; their network is measured by training/evaluation.py's test_report(), as the end of a run's is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cifar.batches import BatchOptions, EvalBatches
from cifar.dataset_files import CifarData, DataError
from core.errors import RunFailed
from runfolder import declarations, lock, store
from runfolder.declarations import CONFUSION_FILE, EVAL_FILE, MISTAKES_FILE
from serving import trained_net
from training.devices import pick_device, resolve_amp
from training.evaluation import CALIBRATION_BINS, TestSet, Weights, test_report, write_test_report
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
    evaluation = test_report(net, Weights(model, checkpoint_path, trained.epoch),
                             TestSet(dataset, batches, data.test_images, data.classes, data.superclasses()),
                             amp_dtype, tta=tta)
    print(f"{model} {checkpoint_path} on the {dataset} test set ({evaluation.images} images"
          f"{', with mirror TTA' if tta else ''}):")
    print(f"Top-1 accuracy: {evaluation.test_acc:.4f}, Top-5 accuracy: {evaluation.test_top5:.4f}, "
          f"Loss: {evaluation.test_loss:.4f}")
    print(f"ECE ({CALIBRATION_BINS} bins): {evaluation.ece:.4f}")
    width = max(len(name) for name in data.classes)
    for name, accuracy in evaluation.per_class.items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    held = lock.lock_run_folder(out_dir)
    try:
        write_test_report(out_dir, evaluation, data.test_images)
    except store.WriteFailed as err:
        raise RunFailed(f"{err}; {checkpoint_path} is untouched; free space, then evaluate again") from None
    finally:
        held.close()
    print(f"Wrote {out_dir / EVAL_FILE}, {out_dir / CONFUSION_FILE} and {out_dir / MISTAKES_FILE}")
    return 0


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
