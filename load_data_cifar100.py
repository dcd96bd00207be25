"""CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): 60,000 32x32 colour images in 100
fine classes grouped into 20 coarse ones. Only its file names and label keys are its own; reading is shared
with CIFAR-10 in cifar/dataset_files.py.
"""
from __future__ import annotations

from pathlib import Path

from cifar.dataset_files import CifarData, CifarSpec, load_cifar

NUM_CLASSES = 100
NUM_COARSE_CLASSES = 20

CIFAR100 = CifarSpec(
    folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",), test_files=("test",), meta_file="meta",
    label_key="fine_labels", class_names_key="fine_label_names", num_classes=NUM_CLASSES,
    coarse_label_key="coarse_labels", coarse_names_key="coarse_label_names", num_coarse_classes=NUM_COARSE_CLASSES)


def load_cifar100(data_dir: str | Path = "data", download: bool = True) -> CifarData:
    """CIFAR-100 with its fine labels (and the coarse ones beside them), downloaded into data_dir if needed."""
    return load_cifar(CIFAR100, data_dir, download)
