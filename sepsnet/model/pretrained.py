"""Pretrained trunk weights from local files (never downloaded) and the input convention they expect.

Two kinds of file (README "Pretrained backbones"):

- a torchvision ResNet/ResNeXt state dict (``.pth``/``.pt``, read with ``weights_only=True``):
  RGB input, ImageNet mean/std on the 0..255 scale, stride on the 3x3 conv;
- a detectron2 model-zoo backbone (``.pkl``): a pickled dict of numpy arrays, either with caffe2
  names (``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``, ...; optionally under ``"blobs"``)
  or detectron2 names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ... under ``"model"``).
  MSRA ``R-50.pkl``/``R-101.pkl``: BGR input, mean (103.53, 116.28, 123.675), std 1, stride on the
  1x1 conv; FAIR ``X-101-32x8d.pkl``: BGR, std (57.375, 57.12, 58.395), stride on the 3x3 conv.
  A ``.pkl`` is read by :func:`safe_unpickle`, which builds only dicts, lists, plain values and
  numpy arrays: a pickle naming any other callable is refused before it runs.

Caffe2 BatchNorm blobs carry only scale and bias (``_bn_s``, ``_bn_b``); the frozen BatchNorm gets
mean 0 and variance ``1 - eps`` so that it multiplies by exactly that scale.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sepsnet.errors import CheckpointError

log = logging.getLogger(__name__)

#: the only globals a backbone pickle may name (numpy array reconstruction, plain containers)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode"),
}
_PLAIN = (str, bytes, int, float, bool, type(None))
FROZEN_BN_EPS = 1e-5


@dataclass(frozen=True)
class InputConvention:
    """What a trunk's weights expect: channel order, mean/std (that order, 0..255), stride placement
    (None: the file does not say, e.g. a torchvision-named state dict)."""

    input_format: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    stride_in_1x1: bool | None


TORCHVISION = InputConvention("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), None)
MSRA = InputConvention("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0), True)
FAIR_RESNEXT = InputConvention("BGR", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395), False)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only dicts, numpy arrays and plain "
                                         f"values are accepted)")
        return super().find_class(module, name)


def _check_plain(obj: Any, where: str = "") -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError(f"pickle entry {where or '<root>'} is an object array")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, bytes, int)):
                raise CheckpointError(f"pickle key {k!r} under {where or '<root>'} is not a string")
            _check_plain(v, f"{where}.{k}" if where else str(k))
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if not isinstance(obj, _PLAIN + (np.generic,)):
        raise CheckpointError(f"pickle entry {where or '<root>'} has type {type(obj).__name__}")


def safe_unpickle(data: bytes, path: str = "pickle") -> Any:
    """Unpickle ``data`` accepting only dicts, lists, plain values and numpy arrays (py2 pickles too)."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        msg = str(exc) if str(exc).startswith("refusing") else f"not a readable pickle ({exc})"
        raise CheckpointError(f"{path}: {msg}") from None
    except Exception as exc:  # truncated or not a pickle
        raise CheckpointError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    _check_plain(obj)
    return obj


# ------------------------------------------------------------------------------------------ names
_C2_BRANCH = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "branch1": "downsample"}
_C2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}


def _c2_to_torchvision(name: str) -> str | None:
    """caffe2 blob name -> torchvision ResNet key (None: not a trunk weight, e.g. fc1000)."""
    if name == "conv1_w":
        return "conv1.weight"
    m = re.fullmatch(r"res_conv1_bn_(s|b|rm|riv)", name)
    if m:
        return f"bn1.{_C2_BN[m.group(1)]}"
    m = re.fullmatch(r"res(\d)_(\d+)_(branch1|branch2[abc])_(w|b|bn_s|bn_b|bn_rm|bn_riv)", name)
    if not m:
        return None
    stage, block, branch, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    prefix = f"layer{stage - 1}.{block}."
    if branch == "branch1":
        return prefix + ("downsample.0.weight" if kind == "w" else f"downsample.1.{_C2_BN[kind[3:]]}")
    conv = _C2_BRANCH[branch]
    if kind == "w":
        return prefix + f"{conv}.weight"
    if kind == "b":
        return None
    return prefix + f"bn{conv[-1]}.{_C2_BN[kind[3:]]}"


def d2_to_torchvision(name: str) -> str | None:
    """detectron2 ResNet key (``stem.conv1.norm.weight``, ``res3.0.shortcut.weight``) -> torchvision key;
    a deformable block's offset conv ``resN.i.conv2_offset.*`` -> ``layer{N-1}.i.conv2.offset.*``."""
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(weight|bias|running_mean|running_var))", name)
    if m:
        return "conv1.weight" if m.group(1) == "weight" else f"bn1.{m.group(2)}"
    m = re.fullmatch(r"res(\d)\.(\d+)\.conv2_offset\.(weight|bias)", name)
    if m:
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.conv2.offset.{m.group(3)}"
    m = re.fullmatch(r"res(\d)\.(\d+)\.(shortcut|conv[123])\.(weight|norm\.(weight|bias|running_mean|running_var))",
                     name)
    if not m:
        return None
    stage, block, conv, tail = int(m.group(1)), m.group(2), m.group(3), m.group(5)
    prefix = f"layer{stage - 1}.{block}."
    if conv == "shortcut":
        return prefix + ("downsample.0.weight" if tail is None else f"downsample.1.{tail}")
    return prefix + (f"{conv}.weight" if tail is None else f"bn{conv[-1]}.{tail}")


def _to_tensors(blobs: dict[str, Any], path: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in blobs.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = torch.from_numpy(np.ascontiguousarray(v)).float()
    if not out:
        raise CheckpointError(f"{path}: no arrays in the pickle")
    return out


def _complete_frozen_bn(state: dict[str, Tensor], trunk_keys: set[str]) -> None:
    """Add mean 0 / variance 1 - eps where a BatchNorm has only scale and bias (caffe2 blobs)."""
    for key in list(state):
        if key.endswith(".weight") and key[: -len("weight")] + "bias" in state:
            base = key[: -len("weight")]
            if base + "running_mean" in trunk_keys and base + "running_mean" not in state:
                state[base + "running_mean"] = torch.zeros_like(state[key])
                state[base + "running_var"] = torch.full_like(state[key], 1.0 - FROZEN_BN_EPS)


def read_detectron2_pkl(path: str, trunk_keys: set[str]) -> tuple[dict[str, Tensor], InputConvention, list[str]]:
    """A detectron2/caffe2 ``.pkl`` backbone -> (torchvision-named state, convention, ignored names)."""
    with open(path, "rb") as f:
        obj = safe_unpickle(f.read(), path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    author = str(obj.get("__author__", ""))
    blobs = obj.get("model") if isinstance(obj.get("model"), dict) else obj.get("blobs", obj)
    if not isinstance(blobs, dict):
        raise CheckpointError(f"{path}: no dict of arrays under 'model' or 'blobs'")
    tensors = _to_tensors(blobs, path)
    state: dict[str, Tensor] = {}
    ignored: list[str] = []
    for name, t in tensors.items():
        bare = name[len("backbone.bottom_up."):] if name.startswith("backbone.bottom_up.") else name
        key = d2_to_torchvision(bare) if "." in bare else _c2_to_torchvision(bare)
        if key is None:
            ignored.append(name)
        else:
            state[key] = t
    _complete_frozen_bn(state, trunk_keys)
    if "conv1.weight" not in state:
        raise CheckpointError(f"{path}: no ResNet stem weight (conv1_w / stem.conv1.weight); "
                              f"not a detectron2 backbone")
    if author == "torchvision":  # converted with detectron2's convert-torchvision-to-d2.py
        conv = TORCHVISION
    else:
        groups = _groups(state)
        conv = FAIR_RESNEXT if groups > 1 else MSRA
    return state, conv, ignored


def _groups(state: dict[str, Tensor]) -> int:
    """Groups of the first bottleneck's 3x3 conv (1 for ResNet, 32 for ResNeXt-32xd)."""
    w2, w1 = state.get("layer1.0.conv2.weight"), state.get("layer1.0.conv1.weight")
    if w2 is None or w1 is None or w2.dim() != 4 or w2.shape[2] != 3:
        return 1
    return max(1, int(w1.shape[0]) // int(w2.shape[1]))


def read_torchvision(path: str) -> dict[str, Tensor]:
    """A torchvision state dict (``weights_only``), ``fc.*`` dropped."""
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects, ...
        raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"backbone weights {path}: expected a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def read_trunk_weights(path: str, trunk_keys: set[str]) -> tuple[dict[str, Tensor], InputConvention]:
    """Any supported file -> (torchvision-named trunk state, the input convention it expects)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"backbone weights file not found: {path} (model.backbone.pretrained)")
    if path.endswith(".pkl"):
        state, conv, ignored = read_detectron2_pkl(path, trunk_keys)
        if ignored:
            log.info("%s: %d non-trunk arrays ignored (e.g. %s)", path, len(ignored), ignored[:3])
        return state, conv
    return read_torchvision(path), TORCHVISION


def weights_convention(path: str) -> InputConvention:
    """The input convention of a pretrained file, without a model."""
    if path.endswith(".pkl"):
        return read_detectron2_pkl(path, set())[1]
    return TORCHVISION


def apply_input_convention(cfg: Any) -> list[str]:
    """Make ``cfg`` (a SEPSNetConfig, in place) use the channel order, mean/std and stride placement
    that ``model.backbone.pretrained`` expects; returns the changes made, one line each."""
    path = cfg.model.backbone.pretrained
    if not path:
        return []
    conv = weights_convention(path)
    changes: list[str] = []
    d, b = cfg.data, cfg.model.backbone
    wanted = {"data.input_format": conv.input_format, "data.pixel_mean": list(conv.pixel_mean),
              "data.pixel_std": list(conv.pixel_std)}
    current = {"data.input_format": d.input_format, "data.pixel_mean": list(d.pixel_mean),
               "data.pixel_std": list(d.pixel_std)}
    for key, value in wanted.items():
        if current[key] != value:
            changes.append(f"{key}: {current[key]} -> {value} (expected by {os.path.basename(path)})")
    if conv.stride_in_1x1 is not None and b.stride_in_1x1 != conv.stride_in_1x1:
        changes.append(f"model.backbone.stride_in_1x1: {b.stride_in_1x1} -> {conv.stride_in_1x1} "
                       f"(expected by {os.path.basename(path)})")
    cfg.data = replace(d, input_format=conv.input_format, pixel_mean=list(conv.pixel_mean),
                       pixel_std=list(conv.pixel_std))
    if conv.stride_in_1x1 is not None:
        cfg.model.backbone = replace(b, stride_in_1x1=conv.stride_in_1x1)
    return changes
