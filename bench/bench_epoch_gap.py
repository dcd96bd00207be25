"""The work between epochs: seconds from the end of one epoch's last training step to the start of the next
epoch's first, with the validation in between counted apart from the rest (saving, logging, plotting).

    python bench/bench_epoch_gap.py --models cnn_resnet18,cnn_densenet121 --data-dir data

Runs main_cifar10.py's training in this process on a small subset (the gap does not depend on the epoch's
size: the checkpoints are the model's and the optimizer's) and times it from the outside, by wrapping the
training batches' iterator and the validation, so it measures any version of train.py alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from anywhere

import train  # noqa: E402
from cifar import batches  # noqa: E402
from core.errors import run_command  # noqa: E402


def measure(model: str, data_dir: str, epochs: int, subset: int) -> dict:
    """Gaps between consecutive epochs of one run, with and without the validation inside them."""
    marks: list[tuple[str, float]] = []
    real_iter, real_evaluate = batches.TrainBatches.__iter__, train.evaluate

    def timed_iter(self):
        first = True
        for batch in real_iter(self):
            if first:
                marks.append(("first step", time.perf_counter()))
                first = False
            yield batch
        marks.append(("last step done", time.perf_counter()))

    def timed_evaluate(*args, **kwargs):
        started = time.perf_counter()
        result = real_evaluate(*args, **kwargs)
        marks.append(("validation", time.perf_counter() - started))
        return result

    batches.TrainBatches.__iter__, train.evaluate = timed_iter, timed_evaluate
    try:
        with tempfile.TemporaryDirectory() as results:
            code = train.main("cifar10", ["--model", model, "--epochs", str(epochs), "--subset", str(subset),
                                          "--batch-size", "64", "--data-dir", data_dir, "--results-dir", results,
                                          "--no-progress", "--device", "cpu"])
    finally:
        batches.TrainBatches.__iter__, train.evaluate = real_iter, real_evaluate
    if code != 0:
        raise SystemExit(code)
    return gaps(marks)


def gaps(marks: list[tuple[str, float]]) -> dict:
    ends = [when for what, when in marks if what == "last step done"]
    starts = [when for what, when in marks if what == "first step"]
    validations = [seconds for what, seconds in marks if what == "validation"]
    whole = [start - end for end, start in zip(ends, starts[1:])]
    without_validation = [gap - validation for gap, validation in zip(whole, validations)]
    return {"gaps": whole, "gap": statistics.median(whole), "validation": statistics.median(validations[:len(whole)]),
            "rest": statistics.median(without_validation)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_resnet18,cnn_densenet121")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run: epochs - 1 gaps [4]")
    parser.add_argument("--subset", type=int, default=128, help="training and validation images [128]")
    args = parser.parse_args(argv)

    def run() -> int:
        print(f"{'model':<18} {'gap s':>8} {'validation s':>13} {'the rest s':>11}  (median of {args.epochs - 1})")
        for model in args.models.split(","):
            result = measure(model, args.data_dir, args.epochs, args.subset)
            print(f"{model:<18} {result['gap']:>8.3f} {result['validation']:>13.3f} {result['rest']:>11.3f}",
                  flush=True)
        return 0
    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
