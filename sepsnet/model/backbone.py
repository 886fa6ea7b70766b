"""Shared backbone (paper Sec. III-A): ResNet/ResNeXt trunk with frozen BatchNorm + FPN P2..P7.

The trunk is a torchvision ResNet built with ``weights=None`` (nothing is ever downloaded)
and :class:`torchvision.ops.misc.FrozenBatchNorm2d`. ``cfg.backbone.pretrained`` may name
a *local* torchvision state dict (e.g. ImageNet weights saved by the user); it is loaded
with ``torch.load(weights_only=True)``.

FPN: :class:`torchvision.ops.FeaturePyramidNetwork` on C2..C5 gives P2..P5; P6 and P7
come from P5 as in FCOS (``LastLevelP6P7`` with P5 as input, ReLU before P7).

Level sizes. Every stride-2 layer of the trunk (7x7/2 pad 3, max-pool 3x3/2 pad 1,
3x3/2 pad 1, 1x1/2) and of P6/P7 (3x3/2 pad 1) maps a side ``s`` to ``ceil(s / 2)``.
So for any H x W input: P2 = ceil(H/4), P3 = ceil(H/8), ..., and each level is
``ceil(previous / 2)``; for multiples of 32 this is exactly H/stride up to P5. The FPN
top-down path resizes the coarser map to the lateral's size, so odd sizes work too.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from sepsnet.config import ModelConfig
from sepsnet.errors import CheckpointError, ConfigError, FrameError

_TRUNKS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
}

#: stride of each output level
STRIDES: dict[str, int] = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def _stage_channels(trunk: torchvision.models.ResNet) -> list[int]:
    """Output channels of layer1..layer4 (64/128/256/512 x expansion)."""
    out = []
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        block = layer[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        out.append(int(last_bn.weight.shape[0]))
    return out


def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """Load a local torchvision ResNet state dict into ``trunk`` (``fc.*`` keys ignored).

    Raises :class:`CheckpointError` for a missing/unreadable file or mismatching keys/shapes.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"backbone weights file not found: {path} (model.backbone.pretrained)")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects, ...
        raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"backbone weights {path}: expected a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # FrozenBatchNorm2d has no num_batches_tracked; it drops that key itself on load
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    wanted = set(own)
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"backbone weights {path} do not match this trunk: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]} (is model.backbone.name right?)"
        )
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(wanted) if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"backbone weights {path}: shape mismatch: {'; '.join(bad[:5])}")
    trunk.load_state_dict(state, strict=False)


class BackboneFPN(nn.Module):
    """ResNet/ResNeXt + FPN -> ``{"p2": .., ..., "p7": ..}``, ``out_channels`` channels each."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bcfg = cfg.backbone
        if bcfg.name not in _TRUNKS:
            raise ConfigError(f"model.backbone.name {bcfg.name!r} not in {sorted(_TRUNKS)}")
        if bcfg.freeze_at not in (0, 1, 2):
            raise ConfigError(f"model.backbone.freeze_at must be 0, 1 or 2, got {bcfg.freeze_at}")
        if cfg.fpn_channels < 1:
            raise ConfigError(f"model.fpn_channels must be positive, got {cfg.fpn_channels}")
        trunk = _TRUNKS[bcfg.name](weights=None, norm_layer=FrozenBatchNorm2d)
        if bcfg.pretrained:
            load_trunk_weights(trunk, bcfg.pretrained)
        del trunk.fc
        del trunk.avgpool
        self.body = trunk
        self.out_channels = int(cfg.fpn_channels)
        self.strides = dict(STRIDES)
        self.fpn = FeaturePyramidNetwork(
            _stage_channels(trunk),
            self.out_channels,
            extra_blocks=LastLevelP6P7(self.out_channels, self.out_channels),  # P6 from P5
        )
        self.freeze_at = bcfg.freeze_at
        self._freeze(bcfg.freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        """freeze_at: 0 nothing, 1 the stem, 2 the stem and res2 (detectron2 convention)."""
        frozen: list[nn.Module] = []
        if freeze_at >= 1:
            frozen += [self.body.conv1, self.body.bn1]
        if freeze_at >= 2:
            frozen.append(self.body.layer1)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (N,3,H,W) -> dict p2..p7 of (N,C,ceil(H/s),ceil(W/s)), s = 4..128."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise FrameError(f"backbone expects images of shape (N,3,H,W), got {tuple(images.shape)}")
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        feats = self.fpn(OrderedDict([("p2", c2), ("p3", c3), ("p4", c4), ("p5", c5)]))
        return {k: feats[k] for k in ("p2", "p3", "p4", "p5", "p6", "p7")}
