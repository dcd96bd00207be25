"""Which device will train here:  python __init__.py

Prints whether a CUDA GPU is available, the PyTorch version and the device the scripts pick by
default, and each GPU's id and name.
"""
import torch


def describe_device() -> str:
    lines = [f"GPU available: {torch.cuda.is_available()}", f"PyTorch version: {torch.__version__}"]
    if torch.cuda.is_available():
        lines.append("Device: cuda")
        lines += [f"GPU {index}: {torch.cuda.get_device_name(index)}"
                  for index in range(torch.cuda.device_count())]
    elif torch.backends.mps.is_available():
        lines.append("Device: mps")
    else:
        lines.append("Device: cpu")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_device())
