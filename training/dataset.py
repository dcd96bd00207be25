"""A run's dataset on its device: the subset and validation split its recipe asks for, and the batches the
epoch loop iterates. Under torchrun rank 0 alone reads (and, if needed, downloads) the files first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cifar.batches import BatchOptions, EvalBatches, TrainBatches, channel_stats, split_validation
from cifar.dataset_files import CifarData
from core.errors import UsageError
from training.flags import Recipe
from training.processes import Processes, rank0_then_share


@dataclass
class RunData:
    """The dataset as a run uses it: its training and validation batches, its test set and what they hold."""

    train_batches: TrainBatches
    val_batches: EvalBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    options: BatchOptions  # normalization, device and memory format, shared by every batch of the run
    validation: str  # "held-out" or "test": what the epochs are validated on
    classes: list[str]
    train_count: int
    val_count: int
    eval_batch_size: int  # validation's and the end-of-run tests' (eval_batch_size below)
    superclasses: dict[str, str] | None  # CIFAR-100's superclass of each class (CifarData.superclasses)

    def test_batches(self) -> EvalBatches:
        """The whole (or --subset) test set, on this process alone."""
        options = BatchOptions(self.options.mean, self.options.std, self.options.device, self.options.channels_last)
        return EvalBatches(self.test_images, self.test_labels, self.eval_batch_size, options)


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    """The batch of validation and of the end-of-run tests: the training batch, and at least 1024 images on CUDA,
    where smaller ones leave the GPU waiting for the host's launches, 256 elsewhere. Each batch's loss is summed in
    float32, so another batch size moves the validation loss in its eighth digit: the CPU keeps the batch it always
    had, and its runs their numbers to the last digit."""
    return max(1024 if device.type == "cuda" else 256, batch_size)


def load_data(recipe: Recipe, load_dataset: Callable[[str], CifarData], data_dir: str, procs: Processes,
              channels_last: bool) -> RunData:
    """The dataset on the device: subset, validation split and the batches the loop iterates."""
    data = rank0_then_share(procs, lambda: load_dataset(data_dir))  # rank 0 alone downloads, if needed
    if data is None:
        data = load_dataset(data_dir)
    mean, std = channel_stats(data.train_images)  # the whole training set, before subset and split
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    # check_flags has held --subset and --val-size against the dataset's size, which cifar/dataset_files.py enforces.
    if recipe.subset is not None:
        train_images, train_labels = train_images[:recipe.subset], train_labels[:recipe.subset]
        test_images, test_labels = test_images[:recipe.subset], test_labels[:recipe.subset]
    val_images, val_labels, validation = test_images, test_labels, "test"
    if recipe.val_size:
        train_index, val_index = split_validation(train_labels, recipe.val_size, recipe.seed)
        val_images, val_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
        validation = "held-out"
    options = BatchOptions(mean, std, procs.device, channels_last, procs.rank, procs.world_size)
    try:
        train_batches = TrainBatches(train_images, train_labels, recipe.batch_size, options, aug=recipe.aug,
                                     seed=recipe.seed)
        eval_batch = eval_batch_size(recipe.batch_size, procs.device)
        val_batches = EvalBatches(val_images, val_labels, eval_batch, options)
    except ValueError as err:  # e.g. fewer images than processes
        raise UsageError(str(err)) from None
    return RunData(train_batches, val_batches, test_images, test_labels, options, validation, data.classes,
                   len(train_labels), len(val_labels), eval_batch, data.superclasses())
