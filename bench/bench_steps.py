"""Training steps per second of BaseCNN at the course's batch size: this project's step (batches.TrainBatches and
optimization.Optimization.step with --recipe course, and the per-step accounting of train.py's loop) against a
plain PyTorch loop over the same images already in memory (the tutorial's loop: index a normalized float tensor,
forward, loss, zero_grad, backward, plain SGD, loss and hits read back with .item()).

    python bench/bench_steps.py [--batch-size 32] [--steps 1000] [--repeats 5] [--threads N]

Many small steps are where per-step overhead shows. The two loops alternate, so a machine busy with other work
slows both alike; the median of the repeats is printed. The images are random: a step's time does not depend on
what the pixels show.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

from common import SEED, describe_run, print_run, seconds

# isort: split
# The project's modules, after common: importing it puts the repository root on sys.path.
from cifar.batches import BatchOptions, TrainBatches
from core import course
from core.errors import run_command
from load_data_cifar10 import NUM_CLASSES
from model import build_model
from training import flags
from training.optimization import EpochSums, make_optimization

MODEL = "cnn_base"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)  # CIFAR-10's, roughly; the figures do not depend on them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=course.RECIPE["batch_size"],
                        help="batch size (default: the course recipe's)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per timed loop (default: 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each loop (default: 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    return run_command(lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    images = torch.randint(0, 256, (args.steps * args.batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (len(images),))
    loops = {"this project's step (TrainBatches + Optimization.step)": ours(images, labels, args.batch_size),
             "plain PyTorch loop (tensors in memory, torch.optim.SGD)": plain(images, labels, args.batch_size)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, loop in loops.items():
            times[name].append(seconds(loop, device))
    print_run(describe_run(device))
    print(f"{MODEL}, --recipe course, batch {args.batch_size}, {args.steps} steps a loop, median of {args.repeats}:")
    plain_median = statistics.median(times[list(loops)[1]][1:])
    for name, measured in times.items():
        median = statistics.median(measured[1:])
        print(f"  {name:58s} {args.steps / median:8.1f} steps/s  ({median:.3f} s; {median / plain_median:.3f} "
              f"of the plain loop's time)")
    return 0


def fresh_net() -> nn.Module:
    torch.manual_seed(SEED)
    return build_model(MODEL, NUM_CLASSES).train()


def ours(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """One pass of train.py's epoch loop over the images with the course recipe."""
    recipe = flags.with_default_lr(flags.with_recipe_defaults(flags.Recipe(recipe=course.NAME, batch_size=batch_size),
                                                          {"batch_size"}))
    batches = TrainBatches(images, labels, batch_size, BatchOptions(MEAN, STD), aug=recipe.aug, seed=recipe.seed)
    net = fresh_net()
    optimization = make_optimization(net, recipe, len(batches), torch.device("cpu"), None)

    def loop() -> None:
        sums = EpochSums(torch.device("cpu"), len(batches))
        for inputs, targets in batches:
            loss, logits = optimization.step(net, inputs, targets)
            sums.add(loss, logits, targets)  # train.py's train_epoch, per step: the sums on the device
        sums.first_bad_step().item()
        sums.result().tolist()
    return loop


def plain(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """The tutorial's loop over the same images, normalized once beforehand."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    inputs_all = (images.float() / 255 - mean) / std
    net = fresh_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def loop() -> None:
        order = torch.randperm(len(images))
        running_loss, correct = 0.0, 0
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            inputs, targets = inputs_all[index], labels[index]
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(targets)
            correct += (outputs.argmax(1) == targets).sum().item()
    return loop


if __name__ == "__main__":
    sys.exit(main())
