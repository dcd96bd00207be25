"""How a network learns: the optimizer, the learning-rate schedule, the loss scaler and one training step,
made from a run's recipe, and the sums each step adds to its epoch's loss and accuracy. train.py's loop and the
benchmarks both call these, so a benchmark measures the step a run takes and cannot drift from it.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from training.devices import accumulator_dtype, autocast
from training.flags import Recipe

# Where fp16 takes the fused SGD, whose kernel takes GradScaler's scale and inf flag on the device (CUDA; the CPU
# since torch 2.4). Without it, GradScaler.step reads the inf flag back with .item() every step, which on a GPU makes
# the host wait for it. MPS has a fused SGD since torch 2.5, but its fp16 path is untested here, so it keeps the
# plain one. CUDA takes the fused SGD in every precision (uses_fused_sgd).
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
    # Set while the parameters and momenta are being copied for a checkpoint (training/recording.py): the next
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
    """SGD with the recipe's momentum (Nesterov or not) and weight decay (fused as uses_fused_sgd says), warmup
    then the recipe's schedule per step over its epochs, a GradScaler that only fp16 autocast needs, and the
    cross-entropy loss."""
    optimizer = _make_sgd(net, recipe, fused=uses_fused_sgd(device, amp_dtype))
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(recipe.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, recipe.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    return Optimization(optimizer, scheduler, scaler, criterion, device, amp_dtype)


def uses_fused_sgd(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether a run's SGD is fused: on CUDA in every precision, elsewhere only for fp16's GradScaler.

    On a GPU, fused SGD updates every parameter in one pass of one kernel (a launch or a few), where torch's
    default there, foreach, takes five ops that each read and write every parameter; ResNet-18's steps at the
    usual batch sizes are bound by launches. It rounds slightly differently from the default, so the CPU keeps
    torch's default (its per-parameter loop) and its numbers, except for fp16, which needs it for GradScaler."""
    if device.type == "cuda":
        return True
    return amp_dtype is torch.float16 and device.type in FUSED_SGD_DEVICES


def _make_sgd(net: nn.Module, recipe: Recipe, fused: bool) -> torch.optim.SGD:
    """The recipe's SGD, fused or torch's default implementation (uses_fused_sgd says which)."""
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


class EpochSums:
    """An epoch's summed loss (each step's mean loss times its batch size) and hits, kept on the device, in five
    kernels a step: the loss times the batch, the predicted classes, their comparison with the labels, the hits'
    sum and one add of both. Each step's two values stay in a row of `recent` until the divergence check reads
    which step, if any, had a loss that is not finite; the image count is the host's.

    The sums add each step's values to the running sums one step at a time in the accumulator's precision (float64
    but on MPS), the loss times the batch rounded to float32 first, as train.py's loop always has: an epoch's
    figures do not change with how the loop launches its work."""

    def __init__(self, device: torch.device, steps_between_checks: int) -> None:
        dtype = accumulator_dtype(device)
        self.totals = torch.zeros(3, device=device, dtype=dtype)  # loss x images, hits, images (filled at the end)
        self._loss_and_hits = self.totals[:2]
        self.recent = torch.zeros(steps_between_checks, 2, device=device, dtype=dtype)
        self._rows = [(row, row[0], row[1]) for row in self.recent]  # views made once, not every step
        self.images = 0
        self.steps = 0
        self._checked_steps = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step's mean loss, logits and labels, added on the device without reading anything back."""
        unchecked = self.steps - self._checked_steps
        if unchecked == len(self._rows):
            raise RuntimeError(f"EpochSums: {unchecked} steps added since the last first_bad_step(); it must be "
                               f"called at least every {len(self._rows)} steps")
        row, loss_times_images, hits = self._rows[unchecked]
        torch.mul(loss, labels.numel(), out=loss_times_images)
        torch.sum(logits.argmax(1) == labels, 0, dtype=hits.dtype, out=hits)
        self._loss_and_hits.add_(row)
        self.steps += 1
        self.images += labels.numel()

    def first_bad_step(self) -> torch.Tensor:
        """On the device: the first step (counted from 1 in the epoch) since the previous call whose loss (times
        its batch size, in float32) was NaN or infinite, or -1."""
        losses = self.recent[:self.steps - self._checked_steps, 0]
        first = self._checked_steps + 1
        self._checked_steps = self.steps
        bad = ~torch.isfinite(losses)
        return torch.where(bad.any(), bad.int().argmax() + first, -1)

    def result(self) -> torch.Tensor:
        """The epoch's sums on the device: loss times images, hits, images."""
        self.totals[2] = self.images
        return self.totals
