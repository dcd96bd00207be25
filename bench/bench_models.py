"""Training and evaluation throughput and peak memory of every model of the zoo on the current device.

    python bench/bench_models.py [--models cnn_base,cnn_resnet18,...] [--device auto] [--batch-size N]
                                 [--warmup N] [--steps N] [--variants fp32,...] [--compile] [--out PATH.json]

Measures the models, not the data: every step gets the same batch of random images, already on the device.
A training step is train.py's own (Optimization.step of training/optimization.py, with the model's default recipe: SGD
with Nesterov momentum, the warmup and cosine schedule of a run at this batch size, cross-entropy); an
evaluation step is a forward pass without gradients in eval mode. Each model is built afresh for every variant:
  fp32                         plain float32, NCHW
  channels_last                float32, model and inputs channels_last
  bf16+channels_last           bf16 autocast and channels_last, as train.py runs on CUDA
  bf16+channels_last+compile   the same under torch.compile (compiling takes a while: only with --compile)
Defaults on CUDA: batch 256, 10 warm-up and 30 timed steps, fp32 and bf16+channels_last. On CPU, where a few
steps are enough to rank the models: batch 32, 3 warm-up and 5 timed steps, fp32.

With --out, the JSON file is rewritten after every row, "complete": false until the last: a benchmark stopped
mid-way (a time limit, Ctrl-C) leaves every model measured before it, in --models order.

Peak memory is that of the training steps above what was in use before the model was built: on CUDA
torch.cuda.max_memory_allocated; on Linux CPUs the growth of the process's peak resident memory (VmHWM, reset
through /proc/self/clear_refs before each model), which also counts memory the allocator kept from earlier
models and reused, so it is a rough figure; "n/a" where neither is available.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common import check_out, describe_run, fresh_model, print_run, save_results, split_names, synchronize

# isort: split
# The project's modules, after common: importing it puts the repository root on sys.path.
from core.errors import UsageError, run_command
from load_data_cifar10 import CIFAR10, NUM_CLASSES
from model import MODELS, build_model, count_flops, count_parameters
from training.devices import DEVICE_CHOICES, autocast, pick_device, set_up_backends


@dataclass(frozen=True)
class Variant:
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool


VARIANTS = {
    "fp32": Variant(None, False, False),
    "channels_last": Variant(None, True, False),
    "bf16+channels_last": Variant(torch.bfloat16, True, False),
    "bf16+channels_last+compile": Variant(torch.bfloat16, True, True),
}
COMPILE_VARIANT = "bf16+channels_last+compile"
# (batch size, warm-up steps, timed steps) by device type: on CPU only enough to rank the models.
DEFAULT_STEPS = {"cuda": (256, 10, 30), "cpu": (32, 3, 5)}
DEFAULT_VARIANTS = {"cuda": ["fp32", "bf16+channels_last"], "cpu": ["fp32"]}
NAME_WIDTH = max(len(name) for name in MODELS)  # the model column fits every name


# -- peak memory -----------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def start_memory(device: torch.device) -> int | None:
    """Resets the peak and returns the bytes in use now, or None where the peak cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            # Hands the memory freed by earlier models back to the system, so that reusing it shows as growth.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current VmRSS (Linux >= 4.0)
            return _status_kib("VmRSS") * 1024
        except (OSError, ValueError):
            return None
    return None


def peak_memory(device: torch.device, in_use_before: int | None) -> int | None:
    """Bytes of the peak since start_memory above what was in use then."""
    if in_use_before is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - in_use_before
    return _status_kib("VmHWM") * 1024 - in_use_before


# -- one model in one variant ------------------------------------------------------------------------------------------

def images_per_second(step, batch_size: int, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):  # torch.compile compiles, cuDNN autotunes, the allocator fills its pools
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def measure(name: str, variant: Variant, args: argparse.Namespace, device: torch.device) -> dict:
    """Training and evaluation images/s and training peak memory of a fresh model."""
    if variant.compile:
        torch.compiler.reset()  # the zoo's models share forward code; without this they exhaust dynamo's cache
    in_use_before = start_memory(device)
    # The schedule of a run at this batch size: a CIFAR-10 epoch's steps.
    steps_per_epoch = math.ceil(CIFAR10.train_size / args.batch_size)
    net, optimization = fresh_model(name, device, variant.channels_last, variant.amp_dtype, steps_per_epoch)
    model: nn.Module = torch.compile(net) if variant.compile else net
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device, memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator).to(device)

    train_rate = images_per_second(lambda: optimization.step(model, inputs, labels),
                                   args.batch_size, args.warmup, args.steps, device)
    peak = peak_memory(device, in_use_before)

    def eval_step() -> None:
        with autocast(device, variant.amp_dtype):
            model(inputs)

    net.eval()
    with torch.no_grad():
        eval_rate = images_per_second(eval_step, args.batch_size, args.warmup, args.steps, device)
    return {"train_images_per_second": train_rate, "eval_images_per_second": eval_rate, "peak_memory_bytes": peak}


# -- the command line ------------------------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated model names (default: all of --list-models)")
    parser.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES),
                        help="device to measure (default: auto, which is cuda, then mps, then cpu)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of training and evaluation (default: 256 on CUDA, 32 elsewhere)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before each timing (default: 10 on CUDA, 3 elsewhere)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps of training and of evaluation (default: 30 on CUDA, 5 elsewhere)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated variants among {', '.join(VARIANTS)} (default: "
                             f"{','.join(DEFAULT_VARIANTS['cuda'])} on CUDA, {','.join(DEFAULT_VARIANTS['cpu'])} "
                             f"elsewhere)")
    parser.add_argument("--compile", action="store_true",
                        help=f"add the {COMPILE_VARIANT} variant to the default ones (off: compiling is slow)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file (default: none)")
    return parser.parse_args(argv)


def settle_arguments(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """Fills in the device's defaults; returns the model and variant names. A UsageError for bad values."""
    batch_size, warmup, steps = DEFAULT_STEPS["cuda" if device.type == "cuda" else "cpu"]
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--warmup", args.warmup, 0),
                               ("--steps", args.steps, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least} (got {value})")
    check_out(args.out, "bench_models")
    names = split_names(args.models, "--models", list(MODELS))
    if args.variants is not None:
        variants = split_names(args.variants, "--variants", list(VARIANTS))
    else:
        variants = list(DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"])
    if args.compile and COMPILE_VARIANT not in variants:
        variants.append(COMPILE_VARIANT)
    return names, variants


def format_memory(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.0f} MiB"


def print_row(row: dict) -> None:
    print(f"{row['model']:{NAME_WIDTH}s} {row['parameters']:>11,} {row['gflops']:7.3g} {row['variant']:27s} "
          f"{row['train_images_per_second']:>11.1f} {row['eval_images_per_second']:>10.1f} "
          f"{format_memory(row['peak_memory_bytes']):>12s}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    stopped = "Interrupted; the rows measured so far are in --out" if args.out else "Interrupted"
    return run_command(lambda: benchmark(args), interrupted=stopped)


def benchmark(args: argparse.Namespace) -> int:
    """Prints the table row by row as models are measured; a UsageError for bad flags or --out."""
    device = pick_device(args.device, 0)
    names, variants = settle_arguments(args, device)
    set_up_backends(device, False)
    run = describe_run(device)
    run.update(batch_size=args.batch_size, warmup_steps=args.warmup, timed_steps=args.steps)
    print_run(run)
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth, rough"
    print(f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps each of training and "
          f"evaluation, random inputs; GFLOPs: forward, one 32x32 image; peak memory: training, {memory}")
    print(f"{'model':{NAME_WIDTH}s} {'params':>11s} {'GFLOPs':>7s} {'variant':27s} {'train img/s':>11s} "
          f"{'eval img/s':>10s} {'peak memory':>12s}")
    rows: list[dict] = []
    save_results(args.out, run, rows, complete=False)
    for name in names:
        for row in measure_model(name, variants, args, device):
            rows.append(row)
            save_results(args.out, run, rows, complete=False)
    save_results(args.out, run, rows, complete=True)
    return 0


def measure_model(name: str, variants: list[str], args: argparse.Namespace, device: torch.device) -> Iterator[dict]:
    """The rows of one model, one per variant that fits in memory, each printed and given as soon as measured."""
    # Counting needs shapes only: the meta device skips allocating the weights.
    with torch.device("meta"):
        counted = build_model(name, NUM_CLASSES)
    parameters, gflops = count_parameters(counted), count_flops(counted) / 1e9
    for variant in variants:
        try:
            result = measure(name, VARIANTS[variant], args, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:{NAME_WIDTH}s} {variant}: out of memory at batch {args.batch_size}; try a smaller "
                  f"--batch-size", flush=True)
            continue
        row = {"model": name, "parameters": parameters, "gflops": gflops, "variant": variant, **result}
        print_row(row)
        yield row


if __name__ == "__main__":
    sys.exit(main())
