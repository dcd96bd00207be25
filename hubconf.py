"""torch.hub entry points: one per model of the zoo, named by its --model flag.

    net = torch.hub.load("<owner>/<repo>", "cnn_resnet18", num_classes=10)   # untrained
    net = torch.hub.load("path/to/clone", "cnn_resnet18", source="local",
                         checkpoint="results/cifar10/cnn_resnet18/best.pt")  # trained

With a checkpoint the network comes wrapped in trained_net.NormalizedNet: it takes images with
values in [0, 1] and normalizes them itself as in training (.net, .mean, .std, .classes).
The entry points are made from the registry in a loop, so a new model needs nothing here.
Everything else in this module starts with "_": torch.hub lists every public callable as a model.
"""
import sys as _sys

from torch import nn as _nn

from model import MODELS as _MODELS
from model import build_model as _build_model
from serving.trained_net import load_trained as _load_trained

dependencies = ["torch"]


def _entry_point(name: str):
    """The function torch.hub calls for one model, with a docstring torch.hub.help shows."""
    def entry_point(num_classes: int | None = None, checkpoint: str | None = None) -> _nn.Module:
        if checkpoint is None:
            return _build_model(name, 10 if num_classes is None else num_classes)
        return _load_trained(checkpoint, model_name=name, num_classes=num_classes)

    source = _sys.modules[_MODELS[name].build.__module__]
    paper = next(iter((source.__doc__ or "").strip().splitlines()), "")  # the family and paper
    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f"{name}: {paper}\n\n"
        "For 3 x 32 x 32 images. Without checkpoint: a freshly initialized network with "
        "num_classes outputs (default 10), taking images normalized by the caller.\n"
        "checkpoint: path of a best.pt of this model; returns the trained network wrapped to take "
        "images with values in [0, 1] and normalize them as in training (.net is the network, "
        ".mean/.std/.classes describe it). num_classes, if given, must match the checkpoint; "
        "ValueError if the file is not a best.pt of this model and class count.")
    return entry_point


for _name in _MODELS:
    globals()[_name] = _entry_point(_name)
