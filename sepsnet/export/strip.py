"""Deploy model: load a checkpoint's weights, strip every train-only branch, and prove
the exported graphs contain none of their weights (paper III: the aux silhouette / semantic /
mask-aux heads only shape training; DESIGN.md "Inference split": no aux branches in engines)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import CheckpointError, EngineError

MIN_FINGERPRINT_NUMEL = 8  # tiny tensors (1-element biases, zero inits) collide by chance


@dataclass
class AuxWeights:
    """What was removed: module names and value fingerprints of their tensors."""

    modules: list[str]
    tensor_names: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)  # sha256 -> tensor name


def _digests(array: np.ndarray) -> list[str]:
    """sha256 of the fp32 and fp16 bytes (an fp16 graph stores the weight converted)."""
    a32 = np.ascontiguousarray(array, dtype=np.float32)
    return [hashlib.sha256(a32.tobytes()).hexdigest(),
            hashlib.sha256(a32.astype(np.float16).tobytes()).hexdigest()]


def _informative(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() >= MIN_FINGERPRINT_NUMEL and bool((t != t.flatten()[0]).any())


def aux_weights(model: torch.nn.Module) -> AuxWeights:
    """Fingerprints of every parameter/buffer of the model's train-only modules."""
    names = list(model.aux_module_names())
    out = AuxWeights(modules=names)
    for mod_name in names:
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue
        for key, t in list(module.named_parameters()) + list(module.named_buffers()):
            full = f"{mod_name}.{key}"
            out.tensor_names.append(full)
            if _informative(t.detach()):
                for d in _digests(t.detach().float().cpu().numpy()):
                    out.fingerprints[d] = full
    return out


def build_deploy_model(cfg: SEPSNetConfig, state_dict: Mapping[str, torch.Tensor],
                       where: str = "checkpoint") -> tuple[torch.nn.Module, AuxWeights]:
    """Full model <- weights (strict), record aux fingerprints, ``strip_aux``, eval mode."""
    from sepsnet.model.sepsnet import SEPSNet, strip_aux

    model = SEPSNet(cfg.model, deploy=False)
    result = model.load_state_dict(dict(state_dict), strict=False)
    aux_prefixes = tuple(m + "." for m in model.aux_module_names())
    # a checkpoint saved from an already stripped model lacks only aux weights: fine for export
    missing = [k for k in result.missing_keys if not k.startswith(aux_prefixes)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit the model of its config: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    aux = aux_weights(model)
    removed = list(strip_aux(model))
    model.eval()
    left = [n for n, _ in model.named_parameters() if any(n == m or n.startswith(m + ".") for m in aux.modules)]
    if left:
        raise EngineError(f"strip_aux left train-only parameters in the deploy model: {left[:5]}")
    aux.modules = sorted(set(aux.modules) | set(removed))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, aux


def assert_no_aux_weights(model: onnx.ModelProto, aux: AuxWeights, where: str) -> dict[str, Any]:
    """Check no initializer (or Constant node) of ``model`` is an aux weight, by name and by value.

    Returns ``{"checked": tensors compared, "aux_tensors": fingerprints}`` for the export log."""
    tensors: list[tuple[str, np.ndarray]] = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    tensors.append((node.output[0], numpy_helper.to_array(a.t)))
    prefixes = tuple(m + "." for m in aux.modules)
    for name, array in tensors:
        clean = name.replace("::", ".").replace("/", ".")
        if clean.startswith(prefixes) or any(f".{m}." in f".{clean}" for m in aux.modules):
            raise EngineError(f"{where}: initializer {name!r} belongs to the train-only module(s) {aux.modules}")
        if array.dtype.kind == "f" and array.size >= MIN_FINGERPRINT_NUMEL:
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest in aux.fingerprints:
                raise EngineError(f"{where}: initializer {name!r} holds the values of train-only weight "
                                  f"{aux.fingerprints[digest]!r}: strip failed")
    return {"checked": len(tensors), "aux_tensors": len(aux.fingerprints) // 2}
