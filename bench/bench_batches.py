"""How long reading CIFAR-10 and making one epoch of training batches take (cifar/dataset_files.py, cifar/batches.py).

    python bench/bench_batches.py [--data-dir data] [--device cpu] [--repeats 5] [--threads N]

Prints the machine, the versions and the date beside the figures, so they can be pasted as evidence. The
target: an epoch of augmented batches costs under a tenth of a BaseCNN training epoch on the same machine.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys

import numpy as np
import torch

from common import machine, seconds

# isort: split
# The project's modules, after common: importing it puts the repository root on sys.path.
from cifar.batches import AUGMENTATIONS, BatchOptions, TrainBatches, channel_stats
from core.errors import run_command
from load_data_cifar10 import load_cifar10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    parser.add_argument("--device", default="cpu", help="where the batches are made: cpu, cuda, cuda:1...")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is shown (default: 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    return run_command(lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> int:
    """Prints the times of loading the dataset and of one epoch of each augmentation; a DataError (a UsageError)
    when the dataset is not in --data-dir."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"machine: {machine(device)}; device {device}")
    print(f"versions: torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}")
    load_times = [seconds(lambda: load_cifar10(args.data_dir, download=False), torch.device("cpu"))
                  for _ in range(args.repeats)]
    data = load_cifar10(args.data_dir, download=False)
    print(f"load CIFAR-10 from {args.data_dir}: median {statistics.median(load_times):.3f} s of {args.repeats} "
          f"(first {load_times[0]:.3f})")

    mean, std = channel_stats(data.train_images)
    print(f"one epoch of batches ({len(data.train_labels)} images, batch {args.batch_size}):")
    for aug in AUGMENTATIONS:
        options = BatchOptions(mean, std, device=device)
        batches = TrainBatches(data.train_images, data.train_labels, args.batch_size, options, aug=aug)
        epoch_times = []
        for epoch in range(args.repeats + 1):
            batches.set_epoch(epoch)
            epoch_times.append(seconds(functools.partial(one_epoch, batches), device))
        print(f"  {aug:17s} median {statistics.median(epoch_times[1:]):.3f} s of {args.repeats} "
              f"(min {min(epoch_times[1:]):.3f}, max {max(epoch_times[1:]):.3f}; first epoch {epoch_times[0]:.3f})")
    return 0


def one_epoch(batches: TrainBatches) -> None:
    for _ in batches:
        pass


if __name__ == "__main__":
    sys.exit(main())
