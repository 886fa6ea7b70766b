"""Checkpoints: written atomically (reading and checking: ``sepsnet.model.weights``).

Layout of a checkpoint file (a ``torch.save`` dict):
``format``, ``model`` (state dict), ``config`` (``SEPSNetConfig.to_dict()``), ``meta``
(class metadata dict or None), ``iteration``, and for resuming ``optimizer``,
``scheduler``, ``rng`` (torch/numpy/python RNG states) and ``scaler`` (AMP).
"""
from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import CheckpointError
from sepsnet.fileio import atomic_write_bytes
from sepsnet.model.weights import FORMAT, describe_load_error, load_checkpoint

LAST_POINTER = "last_checkpoint"
CHECKPOINT_GLOB = "model_*.pt"
# temp files of sepsnet.fileio.atomic_write_bytes (mkstemp: ".<target name>.<8 chars>.tmp") for the files
# training writes into its output folder; a save killed before its rename leaves one behind
STALE_TEMP = re.compile(r"^\.(model_[A-Za-z0-9_]+\.pt|last_checkpoint|metrics\.jsonl)\.[a-z0-9_]{8}\.tmp$")


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
    """Serialise to memory, then write atomically. Updates ``last_checkpoint`` in the folder.
    Refuses (CheckpointError, nothing written) a model with a NaN/Inf weight: a diverged run must
    not replace a good checkpoint."""
    module = model.module if hasattr(model, "module") else model
    bad = first_nonfinite(module)
    if bad is not None:
        raise CheckpointError(f"refusing to write {path}: weight {bad!r} is NaN or Inf (training diverged); "
                              "the files already in the folder are left as they were")
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
    """The checkpoint named by ``folder/last_checkpoint`` if it exists (no loading; resuming uses
    :func:`find_resume_checkpoint`)."""
    return _pointer_target(Path(folder))


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """Name of the first floating parameter or buffer holding NaN/Inf, or None."""
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The ``model_*.pt`` files of a training output folder, by name."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(CHECKPOINT_GLOB) if p.is_file()) if folder.is_dir() else []


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that saves killed mid-write left in ``folder`` (only names matching
    :data:`STALE_TEMP`, only regular files directly in ``folder``). Returns what was removed.
    Call it at start-up, before this process saves anything."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if STALE_TEMP.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def _pointer_target(folder: Path) -> Path | None:
    """The file ``last_checkpoint`` names, if it is a plain name of a file in ``folder``."""
    try:
        name = (folder / LAST_POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    target = folder / name
    return target if target.is_file() else None


def _peek_iteration(path: Path) -> int:
    """The stored iteration, reading only the pickle (tensor data memory-mapped, not read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; read a legacy file in full to tell
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, foreign
            raise CheckpointError(f"cannot read checkpoint {path}: {describe_load_error(exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("iteration"), int) or "model" not in ckpt:
        raise CheckpointError("not a sepsnet training checkpoint (no 'model' / integer 'iteration')")
    return int(ckpt["iteration"])


@dataclass
class ResumePoint:
    """Outcome of :func:`find_resume_checkpoint`: the checkpoint to resume from (``None``: none
    loads), its contents, and each newer or broken candidate that was passed over, with the reason."""

    path: Path | None = None
    checkpoint: dict[str, Any] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    candidates: int = 0


def find_resume_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> ResumePoint:
    """The newest checkpoint of ``folder`` that loads, whatever ``last_checkpoint`` says.

    Candidates: every ``model_*.pt`` and the file the pointer names; ordered by the iteration
    stored inside (the pointer's file first among equals). Each is fully checked
    (:func:`sepsnet.model.weights.load_checkpoint`: readable, sepsnet format, finite weights) and
    the first that passes wins; unreadable ones are reported in ``skipped``. Nothing is modified."""
    folder = Path(folder)
    pointed = _pointer_target(folder)
    candidates = checkpoint_files(folder)
    if pointed is not None and pointed not in candidates:
        candidates.append(pointed)
    result = ResumePoint(candidates=len(candidates))
    ranked: list[tuple[int, int, str, Path]] = []
    for path in candidates:
        try:
            ranked.append((-_peek_iteration(path), 0 if path == pointed else 1, path.name, path))
        except CheckpointError as exc:
            result.skipped.append((path, str(exc)))
    for _, _, _, path in sorted(ranked):
        try:
            ckpt = load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            result.skipped.append((path, str(exc)))
            continue
        result.path, result.checkpoint = path, ckpt
        break
    return result
