"""The model zoo: every network the training scripts can build, by its ``--model`` flag name."""
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.base_cnn import base_cnn
from model.densenet import densenet121, densenet169, densenet201, densenet264
from model.resnet import (
    resnet18, resnet34, resnet50, resnet101, resnet152,
    se_resnet18, se_resnet34, se_resnet50, se_resnet101, se_resnet152,
)

# In README order; each factory takes the number of classes.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "cnn_base": base_cnn,
    "cnn_resnet18": resnet18,
    "cnn_resnet34": resnet34,
    "cnn_resnet50": resnet50,
    "cnn_resnet101": resnet101,
    "cnn_resnet152": resnet152,
    "cnn_densenet121": densenet121,
    "cnn_densenet169": densenet169,
    "cnn_densenet201": densenet201,
    "cnn_densenet264": densenet264,
    "cnn_se_resnet18": se_resnet18,
    "cnn_se_resnet34": se_resnet34,
    "cnn_se_resnet50": se_resnet50,
    "cnn_se_resnet101": se_resnet101,
    "cnn_se_resnet152": se_resnet152,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def count_parameters(net: nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())


def count_flops(net: nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on one 3 x image_size x image_size image, as torch.utils.flop_counter
    counts them (a multiply-add is 2 FLOPs; convolutions and matrix products only)."""
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


def format_flops(flops: int) -> str:
    """'1.111 G' or, for networks as small as BaseCNN, '1.303 M'."""
    return f"{flops / 1e9:.3f} G" if flops >= 1e8 else f"{flops / 1e6:.3f} M"


def model_table_markdown() -> str:
    """The README's model table: parameters and forward FLOPs per 32x32 image for 10 and 100 classes."""
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
