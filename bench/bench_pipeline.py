"""One training epoch through this project's batches versus through a torchvision DataLoader with PIL transforms.

    python bench/bench_pipeline.py [--models cnn_base,cnn_resnet18] [--device auto] [--batch-size 128]
                                   [--repeats 3] [--steps N] [--workers 2] [--out PATH.json]

Both pipelines feed the same model, built afresh from the same seed before every timed epoch, through train.py's
own training step (Optimization.step of training/optimization.py, with the model's default recipe: SGD with Nesterov
momentum, warmup and cosine schedule, cross-entropy; bf16 autocast and channels_last by default on CUDA only) on
the same device at the same batch size:
  project     TrainBatches: the uint8 dataset on the device, crop and flip as batched tensor ops, normalization.
  dataloader  what most CIFAR code and the course code do: a torchvision.datasets.CIFAR10-like Dataset giving
              PIL images, RandomCrop(32, padding=4) and RandomHorizontalFlip on the PIL image, then ToTensor
              and Normalize; a shuffling DataLoader with --workers workers, pin_memory on CUDA and
              persistent_workers off, so that every epoch starts and stops its workers as it does in practice.
An epoch is timed from asking for its first batch (the DataLoader starts its workers then) to its last step
done (torch.cuda.synchronize on CUDA); reading the dataset and building the model are not timed. One untimed
round of a few steps through each pipeline comes first, then the pipelines alternate (project, dataloader,
project, ...) so that a shared machine's drift hits both, and the median of --repeats epochs is shown.

By default cnn_base runs whole epochs and the other models, on CPU, 5 steps per timed epoch (whole epochs on
CUDA). With a step limit both pipelines still pay their whole per-epoch set-up (the project crops and flips all
of the epoch's images when iteration starts; the DataLoader starts its workers), so such a ratio is not the
ratio of whole epochs. Prints the machine, the versions and the date beside the figures.

With --out, the JSON file is rewritten after every timed round (one epoch of each pipeline), "complete": false
until the last: a benchmark stopped mid-way (a time limit, Ctrl-C) leaves the models measured before it and, for
the model it was measuring, the medians of the rounds it finished ("seconds" lists them).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from common import SEED, check_out, describe_run, fresh_model, print_run, save_results, split_names, synchronize

# isort: split
# The project's modules, after common: importing it puts the repository root on sys.path.
from cifar.batches import BatchOptions, TrainBatches, channel_stats
from core.errors import UsageError, run_command
from load_data_cifar10 import load_cifar10
from model import MODELS
from training.devices import DEVICE_CHOICES, pick_device, set_up_backends

PIPELINES = ("project", "dataloader")
# Steps per timed epoch for models other than cnn_base on CPU: a ResNet-18 step at batch 128 takes about 3 s on
# 2 cores, so a whole epoch would take 20 minutes, and the model, not the pipeline, sets the pace there anyway.
CPU_STEPS = 5
WARMUP_STEPS = 2  # the untimed round: first-call costs (allocator, oneDNN/cuDNN set-up, TrainBatches' buffers)


# -- the torchvision pipeline ----------------------------------------------------------------------------------------

class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does for each item: a PIL image from an H x W x C uint8 array, then the
    transforms; over the same arrays as the project's batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C, as CIFAR10 keeps them
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def pil_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """The course code's training transforms: augment the PIL image, then make it a normalized tensor."""
    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def dataloader(dataset: PilCifar, batch_size: int, workers: int, device: torch.device, epoch: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(SEED * 1000 + epoch))


# -- timing ----------------------------------------------------------------------------------------------------------

def timed_epoch(batches: Iterable, step: Callable[[torch.Tensor, torch.Tensor], object], device: torch.device,
                channels_last: bool, max_steps: int | None) -> tuple[float, int]:
    """(seconds, images) of one epoch: max_steps steps, or all of them with None."""
    synchronize(device)
    started = time.perf_counter()
    batch_iterator = iter(batches)  # a DataLoader starts its workers here, as every real epoch does
    images = 0
    for inputs, labels in itertools.islice(batch_iterator, max_steps):
        # The project's batches are on the device already; a DataLoader's come from pinned host memory.
        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        step(inputs, labels.to(device, non_blocking=True))
        images += labels.shape[0]
    del batch_iterator  # stops a DataLoader's workers now, inside the epoch, as the end of a real epoch does
    synchronize(device)
    return time.perf_counter() - started, images


def timed_rounds(name: str, project_batches: TrainBatches, dataset: PilCifar, args: argparse.Namespace,
                 device: torch.device, max_steps: int | None) -> Iterator[tuple[dict[str, list[float]], int]]:
    """After every timed round, the seconds of each timed epoch so far by pipeline, the pipelines taking turns,
    and the images of one epoch."""
    amp_dtype = torch.bfloat16 if args.amp else None
    seconds: dict[str, list[float]] = {pipeline: [] for pipeline in PIPELINES}
    images_per_epoch = 0
    for epoch in range(args.repeats + 1):  # epoch 0 is the untimed warm-up round
        steps = min(WARMUP_STEPS, max_steps or WARMUP_STEPS) if epoch == 0 else max_steps
        for pipeline in PIPELINES:
            net, optimization = fresh_model(name, device, args.channels_last, amp_dtype, len(project_batches))
            if pipeline == "project":
                project_batches.set_epoch(epoch)
                batches: Iterable = project_batches
            else:
                batches = dataloader(dataset, args.batch_size, args.workers, device, epoch)
            step = functools.partial(optimization.step, net)
            took, images_per_epoch = timed_epoch(batches, step, device, args.channels_last, steps)
            if epoch > 0:
                seconds[pipeline].append(took)
            del net, optimization, step
        if epoch > 0:
            yield seconds, images_per_epoch


# -- the command line ------------------------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    parser.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES),
                        help="training device (default: auto, which is cuda, then mps, then cpu)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of both pipelines (default: 128)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed epochs per pipeline and model; the median is shown (default: 3)")
    parser.add_argument("--models", default="cnn_base,cnn_resnet18",
                        help="comma-separated model names (default: cnn_base,cnn_resnet18)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"stop every timed epoch of both pipelines after this many steps (default: whole "
                             f"epochs, except {CPU_STEPS} steps for models other than cnn_base on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off elsewhere)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last model and inputs (default: on for CUDA, off elsewhere)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file (default: none)")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The model names asked for; a UsageError for anything a user can get wrong on the command line."""
    names = split_names(args.models, "--models", list(MODELS))
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--steps", args.steps, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least} (got {value})")
    check_out(args.out, "bench_pipeline")
    return names


def default_steps(name: str, device: torch.device) -> int | None:
    return CPU_STEPS if device.type == "cpu" and name != "cnn_base" else None


def print_table(rows: list[dict], batch_size: int) -> None:
    print(f"batch {batch_size}; a timed epoch is all of an epoch's steps or the number shown; ratio: project time / "
          f"dataloader time")
    print(f"{'model':16s} {'pipeline':10s} {'steps':>9s} {'median s':>9s} {'images/s':>9s} {'ratio':>6s}")
    for row in rows:
        steps = f"{row['steps']} (all)" if row["whole_epoch"] else str(row["steps"])
        print(f"{row['model']:16s} {row['pipeline']:10s} {steps:>9s} {row['median_seconds']:9.3f} "
              f"{row['images_per_second']:9.0f} {row['ratio']:6.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    stopped = "Interrupted; the rounds measured so far are in --out" if args.out else "Interrupted"
    return run_command(lambda: benchmark(args), interrupted=stopped)


def benchmark(args: argparse.Namespace) -> int:
    """Prints each model's medians as they come and the table at the end; a UsageError for bad flags, a missing
    dataset or --out."""
    names = check_arguments(args)
    device = pick_device(args.device, 0)
    data = load_cifar10(args.data_dir, download=False)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    set_up_backends(device, False)
    run = describe_run(device)
    run.update(batch_size=args.batch_size, workers=args.workers, amp="bf16" if args.amp else "off",
               channels_last=args.channels_last, persistent_workers=False, repeats=args.repeats)
    print_run(run)
    print(f"batch {args.batch_size}, dataloader workers {args.workers} (persistent_workers off, pin_memory "
          f"{'on' if device.type == 'cuda' else 'off'}), amp {run['amp']}, channels_last "
          f"{'on' if args.channels_last else 'off'}, repeats {args.repeats} (timed epochs per pipeline)")

    mean, std = channel_stats(data.train_images)
    # Built once, outside the timer, as train.py builds it once per run: this is the dataset load.
    options = BatchOptions(mean, std, device=device, channels_last=args.channels_last)
    project_batches = TrainBatches(data.train_images, data.train_labels, args.batch_size, options, seed=SEED)
    dataset = PilCifar(data.train_images, data.train_labels, pil_transform(mean, std))
    rows: list[dict] = []
    save_results(args.out, run, rows, complete=False)
    for name in names:
        max_steps = args.steps if args.steps is not None else default_steps(name, device)
        for seconds, images in timed_rounds(name, project_batches, dataset, args, device, max_steps):
            measured = model_rows(name, seconds, images, max_steps, len(project_batches))
            save_results(args.out, run, rows + measured, complete=False)
        rows.extend(measured)
        print_medians(measured)
    print()
    print_table(rows, args.batch_size)
    for name in names:
        ratio = next(row["ratio"] for row in rows if row["model"] == name and row["pipeline"] == "project")
        print(f"{name}: the project's pipeline takes {ratio:.3f} of the DataLoader's time, a speed-up of "
              f"{1 / ratio:.2f}x")
    save_results(args.out, run, rows, complete=True)
    return 0


def model_rows(name: str, seconds: dict[str, list[float]], images: int, max_steps: int | None,
               epoch_steps: int) -> list[dict]:
    """One model's row per pipeline, from the timed epochs so far."""
    medians = {pipeline: statistics.median(times) for pipeline, times in seconds.items()}
    rows = [{"model": name, "pipeline": pipeline, "steps": min(max_steps or epoch_steps, epoch_steps),
             "whole_epoch": max_steps is None or max_steps >= epoch_steps,
             "images": images, "seconds": seconds[pipeline], "median_seconds": medians[pipeline],
             "images_per_second": images / medians[pipeline], "ratio": medians[pipeline] / medians["dataloader"]}
            for pipeline in PIPELINES]
    return rows


def print_medians(rows: list[dict]) -> None:
    medians = {row["pipeline"]: row["median_seconds"] for row in rows}
    print(f"{rows[0]['model']}: {rows[0]['steps']} steps, median project {medians['project']:.3f} s, "
          f"dataloader {medians['dataloader']:.3f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
