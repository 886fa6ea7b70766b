"""Checkpoints: written atomically (reading and checking: ``sepsnet.model.weights``).

Layout of a checkpoint file (a ``torch.save`` dict):
``format``, ``model`` (state dict), ``config`` (``SEPSNetConfig.to_dict()``), ``meta``
(class metadata dict or None), ``iteration``, and for resuming ``optimizer``,
``scheduler``, ``rng`` (torch/numpy/python RNG states) and ``scaler`` (AMP).
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.fileio import atomic_write_bytes
from sepsnet.model.weights import FORMAT

LAST_POINTER = "last_checkpoint"


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and python, as tensors/plain types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_literal(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _literal(text: str) -> Any:
    import ast

    return ast.literal_eval(text)


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, cfg: SEPSNetConfig, iteration: int,
                    meta: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, with_rng: bool = True) -> Path:
    """Serialise to memory, then write atomically. Updates ``last_checkpoint`` in the folder."""
    module = model.module if hasattr(model, "module") else model
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": module.state_dict(),
        "config": cfg.to_dict(),
        "meta": meta,
        "iteration": int(iteration),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if with_rng:
        payload["rng"] = capture_rng()
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(path.parent / LAST_POINTER, path.name.encode())
    return path


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint named by ``folder/last_checkpoint`` if it exists."""
    pointer = Path(folder) / LAST_POINTER
    if not pointer.is_file():
        return None
    candidate = Path(folder) / pointer.read_text().strip()
    return candidate if candidate.is_file() else None
