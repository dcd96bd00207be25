"""Shared test setup: the repository root on sys.path, and full-size CIFAR folders made of synthetic
images in the official python format (nothing is downloaded)."""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 3072 uint8 images a small network can learn: a class-coloured square on noise."""
    count = len(labels)
    images = rng.integers(0, 96, size=(count, 3, 32, 32), dtype=np.uint8)
    palette = np.linspace(60, 255, 100).astype(np.uint8)
    for channel, shift in enumerate((0, 37, 71)):
        colour = palette[(labels * 7 + shift) % 100]
        images[:, channel, 8:24, 8:24] = colour[:, None, None]
    return images.reshape(count, 3072)

def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)

@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A data folder holding a full-size (50,000 + 10,000) CIFAR-10 in the official python format."""
    root = tmp_path_factory.mktemp("cifar10-data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(1, 6):
        labels = rng.integers(0, 10, size=10_000)
        write_pickle(folder / f"data_batch_{index}", {
            "batch_label": f"training batch {index} of 5", "labels": labels.tolist(),
            "data": synthetic_images(labels, rng), "filenames": [f"{i}.png" for i in range(10_000)]})
    labels = rng.integers(0, 10, size=10_000)
    write_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
        "data": synthetic_images(labels, rng), "filenames": [f"{i}.png" for i in range(10_000)]})
    write_pickle(folder / "batches.meta", {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                        "ship", "truck"], "num_cases_per_batch": 10_000, "num_vis": 3072})
    return root

@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    """A data folder holding a full-size CIFAR-100 in the official python format."""
    root = tmp_path_factory.mktemp("cifar100-data")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in (("train", 50_000), ("test", 10_000)):
        fine = rng.integers(0, 100, size=count)
        write_pickle(folder / name, {
            "batch_label": f"{name} batch", "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(), "data": synthetic_images(fine, rng),
            "filenames": [f"{i}.png" for i in range(count)]})
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return root
