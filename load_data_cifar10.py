"""CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): 60,000 32x32 colour images in 10
classes. Only its file names and label keys are its own; reading is shared with CIFAR-100 in cifar/dataset_files.py.
"""
from __future__ import annotations

from pathlib import Path

from cifar.dataset_files import CifarData, CifarSpec, load_cifar

NUM_CLASSES = 10

CIFAR10 = CifarSpec(
    folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key="labels", class_names_key="label_names", num_classes=NUM_CLASSES)


def load_cifar10(data_dir: str | Path = "data", download: bool = True) -> CifarData:
    """CIFAR-10 from data_dir, downloaded there first if it holds neither the folder nor the archive."""
    return load_cifar(CIFAR10, data_dir, download)
