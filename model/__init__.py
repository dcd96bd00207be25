"""The model zoo: every network the training scripts can build, by its ``--model`` flag name.

Importing this package is cheap (no torch): the table names each model's factory as "<module>.<function>" of this
folder, and the factory's module, which imports torch, is imported when the model is built. So plot.py orders and
colours the runs of a results folder by the names and families below without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

DEFAULT_LR = 0.1  # the peak learning rate of every model that does not set its own


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the zoo: how to build it, the family it belongs to, whether the course trained it
    (--list-models course), and its default peak learning rate (--lr when the flag is not given)."""

    factory: str  # "resnet.resnet18": the function resnet18 of model/resnet.py, called with the number of classes
    family: str
    course: bool = False
    lr: float = DEFAULT_LR

    @property
    def build(self) -> Callable[[int], nn.Module]:
        """The factory, its module imported on first use."""
        module, function = self.factory.split(".")
        return getattr(importlib.import_module(f"model.{module}"), function)


# Every family, in listing order.
FAMILIES: tuple[str, ...] = ("base", "resnet", "densenet", "se_resnet", "vgg", "resnext", "sknet", "res2net",
                             "scnet", "ca_resnet", "nl_resnet")


# The course's 15 first, in the course report's order; each factory takes the number of classes.
MODELS: dict[str, ModelSpec] = {
    # BaseCNN has no BatchNorm and diverges or trains poorly at 0.1.
    "cnn_base": ModelSpec("base_cnn.base_cnn", "base", course=True, lr=0.05),
    "cnn_resnet18": ModelSpec("resnet.resnet18", "resnet", course=True),
    "cnn_resnet34": ModelSpec("resnet.resnet34", "resnet", course=True),
    "cnn_resnet50": ModelSpec("resnet.resnet50", "resnet", course=True),
    "cnn_resnet101": ModelSpec("resnet.resnet101", "resnet", course=True),
    "cnn_resnet152": ModelSpec("resnet.resnet152", "resnet", course=True),
    "cnn_densenet121": ModelSpec("densenet.densenet121", "densenet", course=True),
    "cnn_densenet169": ModelSpec("densenet.densenet169", "densenet", course=True),
    "cnn_densenet201": ModelSpec("densenet.densenet201", "densenet", course=True),
    "cnn_densenet264": ModelSpec("densenet.densenet264", "densenet", course=True),
    "cnn_se_resnet18": ModelSpec("resnet.se_resnet18", "se_resnet", course=True),
    "cnn_se_resnet34": ModelSpec("resnet.se_resnet34", "se_resnet", course=True),
    "cnn_se_resnet50": ModelSpec("resnet.se_resnet50", "se_resnet", course=True),
    "cnn_se_resnet101": ModelSpec("resnet.se_resnet101", "se_resnet", course=True),
    "cnn_se_resnet152": ModelSpec("resnet.se_resnet152", "se_resnet", course=True),
    # The rest of the networks the course report names.
    "cnn_vgg11": ModelSpec("vgg.vgg11", "vgg"),
    "cnn_vgg13": ModelSpec("vgg.vgg13", "vgg"),
    "cnn_vgg16": ModelSpec("vgg.vgg16", "vgg"),
    "cnn_vgg19": ModelSpec("vgg.vgg19", "vgg"),
    "cnn_resnext29_8x64d": ModelSpec("resnext.resnext29_8x64d", "resnext"),
    "cnn_resnext29_16x64d": ModelSpec("resnext.resnext29_16x64d", "resnext"),
    "cnn_resnext29_32x4d": ModelSpec("resnext.resnext29_32x4d", "resnext"),
    "cnn_sknet29": ModelSpec("sknet.sknet29", "sknet"),
    "cnn_res2next29_6c24w4s": ModelSpec("res2net.res2next29_6c24w4s", "res2net"),
    "cnn_res2net50": ModelSpec("res2net.res2net50", "res2net"),
    "cnn_scnet50": ModelSpec("scnet.scnet50", "scnet"),
    "cnn_scnet101": ModelSpec("scnet.scnet101", "scnet"),
    "cnn_ca_resnet18": ModelSpec("resnet.ca_resnet18", "ca_resnet"),
    "cnn_ca_resnet50": ModelSpec("resnet.ca_resnet50", "ca_resnet"),
    "cnn_nl_resnet18": ModelSpec("resnet.nl_resnet18", "nl_resnet"),
    "cnn_nl_resnet50": ModelSpec("resnet.nl_resnet50", "nl_resnet"),
}
# The 15 networks the course trained, for sweeps that keep to them (--list-models course).
COURSE_MODELS: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if spec.course)
# Every model's family, in --list-models order: what the reports order and colour runs by. plot.py hands it to
# them, as the reports import no model code.
MODEL_FAMILIES: dict[str, str] = {name: spec.family for name, spec in MODELS.items()}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].build(num_classes)


def models_in(selection: str) -> list[str]:
    """Model names of a --list-models selection: "all", "course" (the course's 15) or a family."""
    if selection == "all":
        return list(MODELS)
    if selection == "course":
        return list(COURSE_MODELS)
    if selection in FAMILIES:
        return [name for name, spec in MODELS.items() if spec.family == selection]
    raise ValueError(f"unknown selection {selection!r}; choose all, course or a family: "
                     f"{', '.join(FAMILIES)}")


def count_parameters(net: nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())


def count_flops(net: nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on one 3 x image_size x image_size image, as torch.utils.flop_counter
    counts them (a multiply-add is 2 FLOPs; convolutions and matrix products only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(net.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    # Eval mode so BatchNorm leaves its running statistics alone; each module's own mode is put back
    # afterwards, since a caller may be in the middle of training.
    training_modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(image)
    finally:
        for module, training in training_modes.items():
            module.training = training
    return counter.get_total_flops()


def describe_model(name: str, num_classes: int) -> str:
    """--summary: the network as PyTorch prints it, its parameter count and FLOPs."""
    net = build_model(name, num_classes)
    return (f"{net}\nParameters: {count_parameters(net):,}\n"
            f"FLOPs: {format_flops(count_flops(net))}FLOPs (forward pass of one 3x32x32 image)")


def format_flops(flops: int) -> str:
    """'1.111 G' or, for networks as small as BaseCNN, '1.303 M'."""
    return f"{flops / 1e9:.3f} G" if flops >= 1e8 else f"{flops / 1e6:.3f} M"


def model_table_markdown() -> str:
    """The README's model table: parameters and forward FLOPs per 32x32 image for 10 and 100 classes."""
    import torch

    lines = [
        "| model | params (10 classes) | FLOPs (10 classes) | params (100 classes) | FLOPs (100 classes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        cells = [f"`{name}`"]
        for num_classes in (10, 100):
            # Counting needs shapes only, so the meta device skips allocating and initializing up to
            # 65M weights per model; the operators dispatched, and so the counts, are the same.
            with torch.device("meta"):
                net = build_model(name, num_classes)
            cells += [f"{count_parameters(net):,}", format_flops(count_flops(net))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
