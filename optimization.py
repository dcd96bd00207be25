"""How a network learns: the optimizer, the learning-rate schedule, the loss scaler and one training step,
made from a run's recipe. train.py's loop and the benchmarks both call these, so a benchmark measures the
step a run takes and cannot drift from it.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from cli import Recipe
from devices import autocast

# Where SGD has a fused kernel that takes GradScaler's scale and inf flag on the device (CUDA; the CPU since torch
# 2.4). Without one, GradScaler.step reads the inf flag back with .item() every step, which on a GPU makes the host
# wait for it. MPS has a fused SGD since torch 2.5, but its fp16 path is untested here, so it keeps the plain one.
FUSED_SGD_DEVICES = ("cuda", "cpu")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The learning rate's multiple of --lr before step `step` (from 0): linear warmup per step, then cosine
    decay to zero at the last step, or 1 with the constant schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Optimization:
    """What one training step needs besides the network and the batch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    # Set while the parameters and momenta are being copied for a checkpoint (recording.py): the next
    # update waits for it, while the forward and backward before it go ahead.
    copying: threading.Event | None = None

    def step(self, net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of SGD on one batch; the loss and logits, detached and left on the device (reading them
        back here would make the host wait for the GPU every step)."""
        with autocast(self.device, self.amp_dtype):
            logits = net(inputs)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.copying is not None:
            self.copying.wait()
            self.copying = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), logits.detach()


def make_optimization(net: nn.Module, recipe: Recipe, steps_per_epoch: int, device: torch.device,
                      amp_dtype: torch.dtype | None) -> Optimization:
    """SGD with the recipe's momentum (Nesterov or not) and weight decay, warmup then the recipe's schedule per
    step over its epochs, a GradScaler that only fp16 autocast needs, and the cross-entropy loss."""
    optimizer = _make_sgd(net, recipe, fused=amp_dtype is torch.float16 and device.type in FUSED_SGD_DEVICES)
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(recipe.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, recipe.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    return Optimization(optimizer, scheduler, scaler, criterion, device, amp_dtype)


def _make_sgd(net: nn.Module, recipe: Recipe, fused: bool) -> torch.optim.SGD:
    """The recipe's SGD, fused or torch's default implementation. Only fp16 asks for fused, for the sake of
    GradScaler: the fused kernel rounds slightly differently, and the other precisions keep their numbers."""
    # None, not False: False would also turn off the foreach implementation that CUDA takes by default.
    choice = True if fused else None
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay,
                                fused=choice)

    def keep_choice(loaded: torch.optim.Optimizer) -> None:
        # load_state_dict puts back the saved groups' options, "fused" among them. A --resume may change --amp or
        # --device, and a fused optimizer's step under GradScaler must run the fused kernel (the plain one refuses
        # GradScaler's scale), so this run's choice wins over the saved one.
        for group in loaded.param_groups:
            group["fused"] = choice

    optimizer.register_load_state_dict_post_hook(keep_choice)
    return optimizer
