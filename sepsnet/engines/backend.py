"""The backend protocol: one engine graph (dense or instance) that takes and returns named
torch tensors. Backends only move tensors in and out; all logic lives in ``postprocess``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or names for dynamic dims) and dtype of a graph input/output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"


class Backend(Protocol):
    """One loaded graph. ``run`` takes and returns torch tensors on ``device``.

    A backend may set ``thread_safe = True`` when concurrent ``run`` calls are allowed (ONNX Runtime,
    eager torch); without it the predictor serialises its engine calls (TensorRT: one context)."""

    name: str
    device: torch.device

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
