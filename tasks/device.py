"""The one place that picks the compute device."""

from __future__ import annotations

import torch

from tasks.errors import CurateError


def pick_device(setting: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA device must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CurateError(f"embedding.device={setting}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CurateError(
                f"embedding.device={setting}: only {torch.cuda.device_count()} CUDA "
                "device(s) present"
            )
    return device


def default_input_size(device: torch.device) -> int:
    """224 px where a GPU makes it cheap; 64 px on a CPU, where 224 px runs ~40x slower."""
    return 224 if device.type == "cuda" else 64
