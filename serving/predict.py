"""Predictions on one's own images: the top classes of each image file, and the lines printed.

The network is a trained_net.NormalizedNet, which normalizes images itself as in training, so the
images here are only decoded and scaled to [0, 1]. Photos of any size (PNG, JPEG, and what else
torchvision decodes) are squeezed to the 32x32 the networks were trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from core.errors import UsageError
from serving.trained_net import NormalizedNet

IMAGE_SIZE = 32


class ImageError(UsageError, ValueError):
    """An image file that cannot be used; str() is one line naming the file and what to do. The
    command line shows it and exits 2."""


def read_image(path: str | Path) -> torch.Tensor:
    """A 3 x 32 x 32 float image in [0, 1] from an image file of any size; ImageError if the
    file is missing or not an image."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ImageError(f"{path}: cannot be read ({reason}); pass the path of a PNG or JPEG "
                         "image") from None
    try:
        # EXIF orientation: a phone's portrait photo is stored sideways with a note to turn it.
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):  # not an image, or a damaged one (empty files included)
        raise ImageError(f"{path}: not an image torchvision can decode; pass a PNG or JPEG "
                         "image") from None
    image = F.to_dtype(image, torch.float32, scale=True)  # 8- or 16-bit alike into [0, 1]
    # Squeezed, not cropped: CIFAR images show the whole object, filling most of the frame.
    image = F.resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    return image.clamp_(0, 1)


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), most probable first


@torch.no_grad()
def predict_files(net: NormalizedNet, paths: Sequence[str | Path], device: torch.device | str,
                  class_names: Sequence[str] | None = None, top: int = 5) -> list[Prediction]:
    """The top classes of each image file, with their softmax probabilities.

    Every file is read before any is predicted, so a bad one fails the call before the work.
    class_names default to net.classes, else "class 0", "class 1", ...
    """
    if not isinstance(net, NormalizedNet):
        raise TypeError("predict_files needs a NormalizedNet (trained_net.load_trained gives "
                        "one), so the images are normalized as in training")
    if not paths:
        raise ValueError("predict_files needs at least one image file")
    images = torch.stack([read_image(path) for path in paths])
    net = net.to(device).eval()
    probabilities = torch.softmax(net(images.to(device)).float(), dim=1).cpu()
    names = list(class_names or net.classes or
                 [f"class {index}" for index in range(probabilities.shape[1])])
    if len(names) != probabilities.shape[1]:
        raise ValueError(f"{len(names)} class names for a network of {probabilities.shape[1]} "
                         "classes")
    values, indices = probabilities.topk(min(top, len(names)), dim=1)
    return [Prediction(Path(path), [(names[index], value) for index, value
                                    in zip(row_indices.tolist(), row_values.tolist())])
            for path, row_values, row_indices in zip(paths, values, indices)]


def format_predictions(predictions: list[Prediction]) -> list[str]:
    """One line per image: the file, then its classes with percentages, most probable first."""
    return [f"{prediction.path}: " + ", ".join(f"{name} {100 * probability:.1f}%"
                                               for name, probability in prediction.top)
            for prediction in predictions]
