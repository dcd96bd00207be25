"""A trained network that normalizes its own input, and loading one from a best.pt.

A network trained here expects images normalized with its training set's per-channel statistics.
NormalizedNet carries those statistics (saved in best.pt) and applies them inside forward(), so a
user feeds plain images with values in [0, 1] and cannot normalize them wrongly. hubconf.py and
serving/predict.py both hand out networks this way. Only torch is needed (torch.hub checks no more).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from core.errors import UsageError
from model import build_model
from runfolder.declarations import BestCheckpoint, RunFileError


class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be used as asked; str() is one line naming the file and what to
    do. The command line shows it and exits 2; torch.hub users get a ValueError."""


class NormalizedNet(nn.Module):
    """A network that takes N x 3 x H x W images with values in [0, 1] and normalizes them itself
    with the statistics it was trained with. .net is the network underneath; .mean and .std
    (3 values each; .statistics has them unrounded), .classes (names, or None when the checkpoint has
    none) and .epoch describe it."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str] | None = None, epoch: int | None = None) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (one per RGB channel), got {len(mean)} "
                             f"and {len(std)}")
        self.net = net
        # Buffers: they move with .to(device) and are saved with the state_dict.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # The saved values as they are (the buffers are float32), for code that normalizes by itself.
        self.statistics = (list(mean), list(std))
        self.classes = list(classes) if classes is not None else None
        self.epoch = epoch  # the training epoch the weights are from, where the checkpoint says

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def load_trained(path: str | Path, model_name: str | None = None,
                 num_classes: int | None = None) -> NormalizedNet:
    """The network of a best.pt (on the CPU, in eval mode), wrapped with its normalization.

    model_name and num_classes, when given, must match the checkpoint: a network of another model
    or class count would load wrongly or not at all. CheckpointError otherwise, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train the run first or pass the path of a "
                              "best.pt (--checkpoint)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, not a checkpoint, wrong format
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                              "pass a best.pt of this project") from None
    try:
        best = BestCheckpoint.from_dict(checkpoint if isinstance(checkpoint, dict) else {}, path)
    except (RunFileError, TypeError):
        raise CheckpointError(f"{path} is not a best.pt of this project (a last.pt, or another "
                              "program's file?); pass the run's best.pt") from None
    saved_model, saved_classes = best.model_name, best.num_classes
    if model_name is not None and saved_model != model_name:
        raise CheckpointError(f"{path} holds a {saved_model}, not {model_name}; ask for "
                              f"{saved_model} (--model {saved_model})")
    if num_classes is not None and saved_classes != num_classes:
        raise CheckpointError(f"{path} has {saved_classes} classes, not {num_classes}; use it with "
                              f"{saved_classes} classes (main_cifar{saved_classes}.py) or pass "
                              "another checkpoint")
    try:
        net = build_model(saved_model, saved_classes)
    except ValueError:
        raise CheckpointError(f"{path} holds a {saved_model}, which this version of the project "
                              "does not know; update the project or pass another best.pt") from None
    try:
        net.load_state_dict(best.model)
    except RuntimeError:  # missing, extra or differently shaped weights
        raise CheckpointError(f"{path}: its weights do not fit this version's {saved_model}; "
                              "pass a best.pt made by this version of the project") from None
    return NormalizedNet(net, best.mean, best.std, best.classes, best.epoch).eval()
