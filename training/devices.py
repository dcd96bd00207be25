"""Which device trains, in which precision: the --device and --amp choices and what they resolve to.

train.py and the bench scripts read the choices from here, so the command lines always agree.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from core.errors import UsageError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """--device's choice; auto is cuda, then mps, then cpu."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if requested == "mps" and not mps:
        raise UsageError("--device mps: no Apple GPU is available here; use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and cuda):
        return torch.device("cuda", local_rank)
    if requested == "mps" or (requested == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores


def resolve_amp(requested: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """--amp's name and autocast dtype; auto is bf16 on CUDA GPUs of compute capability 8.0 and up, fp16 (with
    the loss scaler) on older ones (T4, V100: their bf16 convolutions fall back to slow kernels), off elsewhere."""
    if requested != "auto":
        return requested, AMP_DTYPES[requested]
    if device.type != "cuda":
        return "off", None
    name = "bf16" if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else "fp16"
    return name, AMP_DTYPES[name]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Sums over an epoch in float64, except on Apple GPUs, which have no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read next measures the work, not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_up_backends(device: torch.device, deterministic: bool) -> None:
    """The backend settings of training, shared with the benchmarks so that their figures are a run's."""
    if deterministic:
        # cuBLAS needs this set before its first call to give repeatable results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def torchvision_version() -> str | None:
    """For config.json; imported only here, since training itself does not need torchvision."""
    try:
        import torchvision
        return torchvision.__version__
    except ImportError:
        return None
