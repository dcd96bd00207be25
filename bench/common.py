"""What the bench scripts share: the machine and versions printed beside every figure, train.py's device
settings and training step, a timer that waits for the GPU, model-list checking and the --out writer.

Each script puts the repository root on sys.path (so it runs from anywhere) and imports this module from its
own folder; no bench script imports another.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from anywhere
import runs  # noqa: E402
from devices import autocast  # noqa: E402
from errors import UsageError  # noqa: E402
from load_data_cifar10 import NUM_CLASSES  # noqa: E402
from model import MODELS, build_model  # noqa: E402

SEED = 0


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


def set_up_device(device: torch.device) -> None:
    """The same backend settings as train.py, so the figures are those of a real run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Waits for the queued GPU work, so that a timer stopped next measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(action, device: torch.device) -> float:
    """Wall time of action(), the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def fresh_model(name: str, device: torch.device, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model from the same seed each time, in training mode, with train.py's optimizer and learning rate."""
    torch.manual_seed(SEED)
    net = build_model(name, NUM_CLASSES).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=MODELS[name].lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    return net, optimizer


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
               amp_dtype: torch.dtype | None) -> None:
    """train.py's step without its bookkeeping; nothing is read back, so the host never waits for the device."""
    with autocast(inputs.device, amp_dtype):
        loss = F.cross_entropy(net(inputs).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


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


def save_results(out: str | None, run: dict, rows: list[dict]) -> int:
    """Write the run's description and rows as JSON to --out, if given; the exit code."""
    if not out:
        return 0
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(Path(out), {**run, "rows": rows})
    except OSError as err:
        print(f"error: cannot write {out} ({err.strerror}); pass another --out", file=sys.stderr)
        return 2
    return 0
