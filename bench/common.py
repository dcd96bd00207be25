"""What the bench scripts share: the machine and versions printed beside every figure, a fresh model with
train.py's own optimization (training/optimization.py), a timer that waits for the GPU, model-list checking and the
--out writer, which rewrites its file after every result. The training step and the backend settings are the
project's (Optimization.step, devices.set_up_backends), not copies, so a benchmark measures what a run does.

Each script imports this module from its own folder before any project module: importing it puts the
repository root on sys.path (so the scripts run from anywhere). No bench script imports another.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from anywhere
from core.errors import UsageError
from load_data_cifar10 import NUM_CLASSES
from model import build_model
from runfolder import store
from training import flags
from training.devices import synchronize
from training.optimization import Optimization, make_optimization

SEED = flags.Recipe().seed  # the default recipe's: the models' initialization and the batches' order


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    described = f"{cpu_name()}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads"
    if device.type == "cuda":
        described = f"{torch.cuda.get_device_name(device)} with {described}"
    return described


def describe_run(device: torch.device) -> dict:
    """The machine, versions and date that every table of these benchmarks is printed with."""
    return {"machine": machine(device), "device": str(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="minutes")}


def print_run(run: dict) -> None:
    print(f"machine: {run['machine']}; device {run['device']}")
    print(f"versions: torch {run['torch']}, torchvision {run['torchvision']}, python {run['python']}; {run['date']}")


def seconds(action, device: torch.device) -> float:
    """Wall time of action(), the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def fresh_model(name: str, device: torch.device, channels_last: bool, amp_dtype: torch.dtype | None,
                steps_per_epoch: int) -> tuple[nn.Module, Optimization]:
    """The model from the same seed each time, in training mode, and train.py's optimization of it for the
    model's default recipe (SGD, learning rate, warmup and cosine schedule over epochs of steps_per_epoch steps,
    loss scaler, loss): benchmarks call its step(net, inputs, labels), the step of a run."""
    recipe = flags.with_default_lr(flags.Recipe(model=name))
    torch.manual_seed(recipe.seed)
    net = build_model(name, NUM_CLASSES).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    return net, make_optimization(net, recipe, steps_per_epoch, device, amp_dtype)


def split_names(text: str, flag: str, known: list[str]) -> list[str]:
    """The comma-separated names of a flag; a UsageError for an unknown one or none."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def check_out(out: str | None, script: str) -> None:
    if out and Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; pass a file name such as {out}/{script}.json")


def save_results(out: str | None, run: dict, rows: list[dict], complete: bool) -> None:
    """Write the run's description and rows as JSON to --out, if given, with "complete": false until the last
    row. The scripts call it once before measuring (a bad --out fails at once) and again after every result,
    each time replacing the file whole (store.write_json), so that a benchmark stopped mid-way (Ctrl-C, a time
    limit's SIGTERM or SIGKILL) leaves every result measured before it. A UsageError when it cannot write."""
    if not out:
        return
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        store.write_json(Path(out), {**run, "complete": complete, "rows": rows})
    except store.WriteFailed as err:  # "cannot write PATH (reason)"
        raise UsageError(f"{err}; pass another --out") from None
    except OSError as err:
        raise UsageError(f"cannot write {out} ({err.strerror}); pass another --out") from None
