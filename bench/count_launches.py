"""ATen operations per training step, counted on the CPU: what a step asks of the device, each a kernel launch on
a GPU (or a few: a foreach or fused optimizer op launches one kernel per chunk of parameters). Small models at
the usual batch sizes are bound by these launches, not by arithmetic, so fewer ops is a faster step there.

    python bench/count_launches.py [--models cnn_base,cnn_resnet18] [--batch-size 4]

Runs train.py's own train_epoch for three steps under a TorchDispatchMode and counts the ops of its second step
(the first creates the momentum buffers; the third is the epoch's last, which reads the sums back for the
divergence check), split into making the batch (batches.TrainBatches), Optimization.step (forward, loss,
backward, optimizer, scheduler) and the loop's own accounting (the epoch's loss and hit sums and the divergence
mark). View ops (select, slice, view, detach...) and the profiler's marks launch nothing and are left out.
Each precision is counted with the three SGD implementations: torch's per-parameter loop (the CPU's default),
foreach (CUDA's default) and fused; the columns `cpu` and `cuda` mark the one training/optimization.py picks on each
device. The counts do not depend on the batch size or the pixels; the CPU's autocast casts a few ops
differently from CUDA's, so the bf16 and fp16 forward counts are close to, not equal to, a GPU's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import SEED, split_names

# isort: split
# The project's modules, after common: importing it puts the repository root on sys.path.
import train
from cifar.batches import BatchOptions, TrainBatches
from core.errors import run_command
from load_data_cifar10 import NUM_CLASSES
from model import build_model, models_in
from training import flags, optimization
from training.devices import AMP_DTYPES
from training.processes import Processes

STEPS = 3
COUNTED_STEP = 2
SGD_IMPLEMENTATIONS = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
                       "fused": {"foreach": False, "fused": True}}


class OpCounter(TorchDispatchMode):
    """Non-view ATen ops per (step, phase): phase is what the loop is doing, set by the wrappers below."""

    def __init__(self) -> None:
        super().__init__()
        self.step, self.phase = 0, "loop"
        self.ops: Counter[tuple[int, str]] = Counter()
        self.names: Counter[tuple[int, str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.namespace == "aten":  # profiler's record_function marks launch nothing
            self.ops[self.step, self.phase] += 1
            self.names[self.step, self.phase, str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class CountedBatches:
    """TrainBatches, its iteration counted as the phase "batch"."""

    def __init__(self, batches: TrainBatches, counter: OpCounter) -> None:
        self.batches, self.counter = batches, counter

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self):
        iterator = iter(self.batches)
        while True:
            self.counter.phase = "batch"
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.counter.phase = "loop"
            yield batch


def sgd_picked(device_type: str, amp_dtype: torch.dtype | None) -> str:
    """The implementation training/optimization.py picks on a device (unfused: torch's default there)."""
    if optimization.uses_fused_sgd(torch.device(device_type), amp_dtype):
        return "fused"
    return "foreach" if device_type == "cuda" else "for-loop"


def count_step(model: str, amp: str, sgd: str, batch_size: int, folder: Path) -> dict[str, int]:
    """The ops of one steady-state step of train.train_epoch, per phase."""
    device, amp_dtype = torch.device("cpu"), AMP_DTYPES[amp]
    images = torch.randint(0, 256, (STEPS * batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (len(images),))
    recipe = flags.with_default_lr(flags.Recipe(model=model, batch_size=batch_size))
    counter = OpCounter()
    batches = TrainBatches(images, labels, batch_size, BatchOptions((0.5,) * 3, (0.25,) * 3),
                           aug=recipe.aug, seed=recipe.seed)
    torch.manual_seed(SEED)
    net = build_model(model, NUM_CLASSES).train()
    steps = optimization.make_optimization(net, recipe, len(batches), device, amp_dtype)
    for group in steps.optimizer.param_groups:
        group.update(SGD_IMPLEMENTATIONS[sgd])
    real_step = steps.step

    def counted_step(*args):
        counter.step += 1
        counter.phase = "step"
        try:
            return real_step(*args)
        finally:
            counter.phase = "accounting"
    steps.step = counted_step
    run = SimpleNamespace(procs=Processes(False, 0, 1, 0, device), folder=folder, recipe=recipe,
                          config=SimpleNamespace(settings=flags.Settings(no_progress=True)))
    data = SimpleNamespace(train_batches=CountedBatches(batches, counter))
    training = train.NetworkAndOptimization(net, net, steps, 0, 0)
    with counter:
        train.train_epoch(run, data, training, SimpleNamespace(history=[]), 1)
    return {phase: counter.ops[COUNTED_STEP, phase] for phase in ("batch", "step", "accounting")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn_base,cnn_resnet18",
                        help="comma-separated models (default: cnn_base,cnn_resnet18)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4)")
    args = parser.parse_args(argv)
    return run_command(lambda: count(split_names(args.models, "--models", models_in("all")), args.batch_size))


def count(models: list[str], batch_size: int) -> int:
    torch.set_num_threads(1)
    print(f"ATen ops (non-view) in step {COUNTED_STEP} of train.train_epoch, batch {batch_size}, torch "
          f"{torch.__version__}")
    print(f"{'model':14s} {'amp':4s} {'sgd':8s} {'cpu':3s} {'cuda':4s} {'batch':>5s} {'step':>5s} "
          f"{'accounting':>10s} {'total':>5s}")
    with tempfile.TemporaryDirectory() as folder:
        for model in models:
            for amp in ("off", "bf16", "fp16"):
                for sgd in SGD_IMPLEMENTATIONS:
                    if amp == "fp16" and sgd != "fused":
                        continue  # the loss scaler hands its scale to the fused kernel, which the others refuse
                    ops = count_step(model, amp, sgd, batch_size, Path(folder))
                    marks = ["x" if sgd_picked(device, AMP_DTYPES[amp]) == sgd else "" for device in ("cpu", "cuda")]
                    print(f"{model:14s} {amp:4s} {sgd:8s} {marks[0]:3s} {marks[1]:4s} {ops['batch']:5d} "
                          f"{ops['step']:5d} {ops['accounting']:10d} {sum(ops.values()):5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
