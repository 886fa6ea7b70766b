"""Device names for the runtime: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a bare GPU index.

One place turns what a user typed into a ``torch.device`` (or a clear :class:`EngineError`), so
TensorRT and ONNX Runtime backends land on the same GPU and two predictors can share or split GPUs.
"""
from __future__ import annotations

import torch

from sepsnet.errors import EngineError


def resolve_device(device: str | int | torch.device | None = "auto") -> torch.device:
    """``auto``/None: ``cuda:0`` when torch sees a GPU, else ``cpu``. ``cuda`` = ``cuda:0``;
    an int or a digit string N = ``cuda:N``. EngineError naming the device when it does not exist."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        dev = torch.device("cuda", int(device))
    else:
        try:
            dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
        except (RuntimeError, TypeError, ValueError):
            raise EngineError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or a GPU index N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise EngineError(f"device {device!r}: the runtime runs on cpu or cuda GPUs only")
    if not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked, but torch sees no CUDA GPU here; use device='cpu' or 'auto'")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise EngineError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)
