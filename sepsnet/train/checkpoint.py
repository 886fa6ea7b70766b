"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the config.

Layout of a checkpoint file (a ``torch.save`` dict):
``format``, ``model`` (state dict), ``config`` (``SEPSNetConfig.to_dict()``), ``meta``
(class metadata dict or None), ``iteration``, and for resuming ``optimizer``,
``scheduler``, ``rng`` (torch/numpy/python RNG states) and ``scaler`` (AMP).
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sepsnet.config import SEPSNetConfig, config_from_dict
from sepsnet.errors import CheckpointError, ConfigError
from sepsnet.fileio import atomic_write_bytes

FORMAT = "sepsnet-checkpoint/1"
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


def save_checkpoint(path: Union[str, Path], *, model: torch.nn.Module, cfg: SEPSNetConfig, iteration: int,
                    meta: Optional[dict] = None, optimizer: Optional[torch.optim.Optimizer] = None,
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


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a sepsnet checkpoint (no 'model' entry)")
    if ckpt.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {ckpt.get('format')!r}, expected {FORMAT}")
    for name, tensor in ckpt["model"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: weight {name!r} contains NaN or Inf")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: Union[str, Path] = "checkpoint") -> SEPSNetConfig:
    """The config stored in a checkpoint."""
    if "config" not in ckpt:
        raise CheckpointError(f"{path}: checkpoint has no stored config; pass --config")
    try:
        return config_from_dict(ckpt["config"], where=f"{path} (stored config)")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def check_compatible(ckpt: dict[str, Any], cfg: SEPSNetConfig, path: Union[str, Path] = "checkpoint") -> None:
    """Refuse a checkpoint whose model section differs from ``cfg.model``, naming the keys."""
    stored = ckpt.get("config", {}).get("model")
    if stored is None:
        return
    current = cfg.to_dict()["model"]
    diffs = _diff(stored, current)
    # a different pretrained path or fused flag does not change the weights
    diffs = [d for d in diffs if not d.startswith(("backbone.pretrained", "blender.fused", "loss_weights", "components.mask_loss"))]
    if diffs:
        raise CheckpointError(
            f"{path} was trained with another model config; differing keys: " + ", ".join(diffs[:8])
        )


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Union[str, Path] = "checkpoint",
                       strict: bool = True) -> None:
    """``load_state_dict`` with a readable error instead of a wall of key names."""
    module = model.module if hasattr(model, "module") else model
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def latest_checkpoint(folder: Union[str, Path]) -> Optional[Path]:
    """The checkpoint named by ``folder/last_checkpoint`` if it exists."""
    pointer = Path(folder) / LAST_POINTER
    if not pointer.is_file():
        return None
    candidate = Path(folder) / pointer.read_text().strip()
    return candidate if candidate.is_file() else None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}." if isinstance(a.get(k), dict) else f"{prefix}{k}")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} != {b!r})"]
