"""Reading sepsnet checkpoints for any consumer (evaluation, export, the runtime): ``weights_only=True``
loads, NaN/Inf weight checks, the stored config, and model-config compatibility with readable errors.
Writing (atomic saves, RNG state for exact resume) is training's job: ``sepsnet.train.checkpoint``.
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from sepsnet.config import SEPSNetConfig, config_from_dict
from sepsnet.errors import CheckpointError, ConfigError

FORMAT = "sepsnet-checkpoint/1"
log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) with clear errors."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {describe_load_error(exc)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a sepsnet checkpoint (no 'model' entry)")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path} is not a sepsnet checkpoint ('model' is a {type(ckpt['model']).__name__}, "
                              "not a state dict)")
    for key, kinds in (("config", dict), ("meta", (dict, type(None))), ("iteration", int)):
        if key in ckpt and (not isinstance(ckpt[key], kinds) or isinstance(ckpt[key], bool)):
            raise CheckpointError(f"{path}: malformed checkpoint: {key!r} is a {type(ckpt[key]).__name__}")
    if ckpt.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {ckpt.get('format')!r}, expected {FORMAT}")
    for name, tensor in ckpt["model"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: weight {name!r} contains NaN or Inf")
    return ckpt


_UNSAFE_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
# lines of torch's message that give advice (retry with weights_only=False, file an issue, docs link)
_ADVICE = ("weights only load failed", "weights_only", "please file an issue", "check the documentation",
           "trusted source", "https://")


def describe_load_error(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``. A refused pickle (a class or function
    outside torch's allow-list: a file that could run code) is named as such with the global it
    wanted; torch's advice to retry with ``weights_only=False`` is deliberately not passed on."""
    text = str(exc)
    match = _UNSAFE_GLOBAL.search(text)
    if match:
        return (f"refused: it references {match.group(1)}, which is not a tensor or plain data; loading it "
                "could run code, so sepsnet does not (checkpoints are read with weights_only=True only)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    facts = [ln for ln in lines if not any(a in ln.lower() for a in _ADVICE)]
    detail = facts[0] if facts else (lines[0] if lines else "")
    if isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in text.lower():
        return f"not a readable torch checkpoint (corrupt, truncated or another format: {detail or 'unpickling'})"
    detail = detail.split(". ")[0].rstrip(".")  # torch's zip errors go on with advice after the first sentence
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def checkpoint_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> SEPSNetConfig:
    """The config stored in a checkpoint."""
    if "config" not in ckpt:
        raise CheckpointError(f"{path}: checkpoint has no stored config; pass --config")
    try:
        return config_from_dict(ckpt["config"], where=f"{path} (stored config)")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def check_compatible(ckpt: dict[str, Any], cfg: SEPSNetConfig, path: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint whose model section differs from ``cfg.model``, naming the keys."""
    stored = ckpt.get("config", {}).get("model")
    if stored is None:
        return
    current = cfg.to_dict()["model"]
    diffs = _diff(stored, current)
    # a different pretrained path, fused flag or loss setting does not change the weights
    ignored = ("backbone.pretrained", "backbone.allow_random_frozen", "blender.fused", "loss_weights",
               "components.mask_loss")
    diffs = [d for d in diffs if not d.startswith(ignored)]
    if diffs:
        raise CheckpointError(
            f"{path} was trained with another model config; differing keys: " + ", ".join(diffs[:8])
        )


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path = "checkpoint",
                       strict: bool = True) -> dict[str, list[str]]:
    """``load_state_dict`` with readable errors; returns ``{"missing", "unexpected", "mismatched"}``.

    ``strict`` (the default, and what ``--weights`` does): any missing or unexpected key, or any
    shape difference, raises :class:`CheckpointError` naming them. ``strict=False`` (``--weights-partial``):
    they are listed in a warning and left out (the model keeps its own initialisation there, as in
    detectron2). A state that matches none of the model's weights is always an error."""
    module = model.module if hasattr(model, "module") else model
    own = module.state_dict()
    ignorable = ("num_batches_tracked",)
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and torch.is_tensor(v) and torch.is_tensor(own[k]) and v.shape != own[k].shape]
    missing = sorted(k for k in own if k not in state and not k.endswith(ignorable))
    unexpected = sorted(k for k in state if k not in own and not k.endswith(ignorable))
    matched = [k for k in state if k in own and k not in {m[0] for m in mismatched}]
    if not matched:
        raise CheckpointError(
            f"{path} matches none of this model's {len(own)} weights ({len(unexpected)} unexpected keys, e.g. "
            f"{_names(unexpected, 5)}); is it a sepsnet checkpoint? (detectron2/AdelaiDet models: sepsnet-convert)")
    desc = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:8])
    if mismatched and len(mismatched) > 8:
        desc += f" (and {len(mismatched) - 8} more)"
    if strict and mismatched:
        raise CheckpointError(f"{path} does not fit this model: {len(mismatched)} weights differ in "
                              f"shape: {desc}")
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not fit this model: {len(missing)} missing keys [{_names(missing)}], "
            f"{len(unexpected)} unexpected keys [{_names(unexpected)}]; pass --weights-partial to load only "
            f"the matching ones")
    if mismatched:
        log.warning("%s: not loading %d weights whose shape differs from the model's: %s", path, len(mismatched),
                    desc)
    if missing or unexpected:
        log.warning("%s: partial load, %d of %d model weights loaded; left at their initialisation: %s; "
                    "ignored: %s", path, len(matched), len(own), _names(missing), _names(unexpected))
    dropped = {k for k, _, _ in mismatched}
    state = {k: v for k, v in state.items() if k not in dropped}
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # anything the checks above did not foresee, still named
        raise CheckpointError(f"{path} does not fit this model: {exc}") from None
    return {"missing": missing, "unexpected": unexpected, "mismatched": sorted(dropped)}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}." if isinstance(a.get(k), dict) else f"{prefix}{k}")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} != {b!r})"]
