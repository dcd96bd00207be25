"""The global random-number generators' state (torch's, numpy's, Python's and the training GPU's), as last.pt
saves it and a resume puts it back, so that a resumed run behaves like an unbroken one.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state(device: torch.device | None = None) -> dict:
    """The global generators' states; of the GPUs, only the training device's (a run may be resumed with
    fewer GPUs visible)."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [numpy_keys.tolist(), numpy_pos, numpy_has_gauss, numpy_gauss],
             "python": [python_version, list(python_internal), python_gauss]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    # Batches draw from their own (seed, epoch) generator; these only matter to code that uses the
    # global generators (dropout, say), restored so that a resumed run behaves like an unbroken one.
    torch.set_rng_state(state["torch"])
    numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(numpy_keys, dtype=np.uint32), numpy_pos,
                         numpy_has_gauss, numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # older runs saved every visible GPU's; take the device's
        index = (device.index or 0) if device is not None else 0
        cuda_state = cuda_state[index] if index < len(cuda_state) else None
    if cuda_state is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
