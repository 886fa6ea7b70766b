"""Shared backbone (paper Sec. III-A): ResNet/ResNeXt trunk with frozen BatchNorm + FPN P2..P7.

The trunk is a torchvision ResNet built with ``weights=None`` (nothing is ever downloaded)
and :class:`torchvision.ops.misc.FrozenBatchNorm2d`; the list of trunks is
:data:`sepsnet.model.registry.BACKBONES`. ``pretrained`` may name a *local* torchvision state dict
or a detectron2 model-zoo ``.pkl`` (:mod:`sepsnet.model.pretrained`); ``stride_in_1x1`` moves the
stride-2 of each stage's first bottleneck to its 1x1 conv (MSRA/caffe2 ResNets).

FPN: :class:`torchvision.ops.FeaturePyramidNetwork` on C2..C5 gives P2..P5; P6 and P7
come from P5 as in FCOS (``LastLevelP6P7`` with P5 as input, ReLU before P7).

Level sizes. Every stride-2 layer of the trunk (7x7/2 pad 3, max-pool 3x3/2 pad 1,
3x3/2 pad 1, 1x1/2) and of P6/P7 (3x3/2 pad 1) maps a side ``s`` to ``ceil(s / 2)``.
So for any H x W input: P2 = ceil(H/4), P3 = ceil(H/8), ..., and each level is
``ceil(previous / 2)``; for multiples of 32 this is exactly H/stride up to P5. The FPN
top-down path resizes the coarser map to the lateral's size, so odd sizes work too.
"""
from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from sepsnet.config import ModelConfig
from sepsnet.errors import CheckpointError, ConfigError, FrameError
from sepsnet.model.deform import make_deformable
from sepsnet.model.pretrained import InputConvention, read_trunk_weights
from sepsnet.model.registry import BACKBONES

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


def build_trunk(name: str, stride_in_1x1: bool = False, deform_on_per_stage: tuple[bool, ...] = (False,) * 4,
                deform_modulated: bool = False, deform_interval: int = 1,
                deform_num_groups: int = 1) -> torchvision.models.ResNet:
    """The registry's torchvision trunk with FrozenBatchNorm2d, no weights, no ``fc``/``avgpool``;
    ``deform_*``: deformable 3x3 convs in the chosen bottlenecks (:mod:`sepsnet.model.deform`)."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone.name {name!r} not in {sorted(BACKBONES)}")
    trunk = getattr(torchvision.models, BACKBONES[name].torchvision_fn)(weights=None, norm_layer=FrozenBatchNorm2d)
    del trunk.fc
    del trunk.avgpool
    if stride_in_1x1:
        for layer in (trunk.layer2, trunk.layer3, trunk.layer4):
            first = layer[0]
            if not hasattr(first, "conv3"):
                raise ConfigError(f"model.backbone.stride_in_1x1 needs a bottleneck trunk, not {name}")
            first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    if any(deform_on_per_stage):
        if not BACKBONES[name].bottleneck:
            raise ConfigError(f"model.backbone.deform_on_per_stage needs a bottleneck trunk, not {name}")
        make_deformable([trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4], deform_on_per_stage,
                        deform_interval, deform_modulated, deform_num_groups)
    return trunk


def load_trunk_weights(trunk: nn.Module, path: str) -> InputConvention:
    """Load a local torchvision state dict or detectron2 ``.pkl`` into ``trunk``; returns the input
    convention the weights expect. Raises :class:`CheckpointError` for a missing/unreadable file or
    mismatching keys/shapes. The offset convs of deformable blocks (``*.conv2.offset.*``) may be absent:
    ImageNet trunks have none, and they are then set to zero (the plain conv), as in detectron2."""
    own = dict(trunk.state_dict())
    state, convention = read_trunk_weights(path, set(own))
    offsets = {k for k in own if ".conv2.offset." in k}
    wanted, given = set(own), set(state)
    missing, unexpected = sorted(wanted - given - offsets), sorted(given - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"backbone weights {path} do not match this trunk: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]} (is model.backbone.name right?)"
        )
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(wanted & given) if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"backbone weights {path}: shape mismatch: {'; '.join(bad[:5])}")
    trunk.load_state_dict({**{k: own[k].new_zeros(own[k].shape) for k in offsets - given}, **state}, strict=True)
    return convention


class BackboneFPN(nn.Module):
    """ResNet/ResNeXt + FPN -> ``{"p2": .., ..., "p7": ..}``, ``out_channels`` channels each."""

    def __init__(self, name: str, out_channels: int, freeze_at: int = 2, pretrained: str | None = None,
                 stride_in_1x1: bool = False, deform_on_per_stage: tuple[bool, ...] = (False,) * 4,
                 deform_modulated: bool = False, deform_interval: int = 1, deform_num_groups: int = 1) -> None:
        super().__init__()
        if freeze_at not in (0, 1, 2):
            raise ConfigError(f"model.backbone.freeze_at must be 0, 1 or 2, got {freeze_at}")
        if out_channels < 1:
            raise ConfigError(f"model.fpn_channels must be positive, got {out_channels}")
        trunk = build_trunk(name, stride_in_1x1, tuple(deform_on_per_stage), deform_modulated, deform_interval,
                            deform_num_groups)
        self.input_convention: InputConvention | None = None
        if pretrained:
            self.input_convention = load_trunk_weights(trunk, pretrained)
            expected = self.input_convention.stride_in_1x1
            if expected is not None and expected != stride_in_1x1:
                raise ConfigError(
                    f"{pretrained} expects model.backbone.stride_in_1x1={expected}, "
                    f"the config says {stride_in_1x1}")
        self.body = trunk
        self.out_channels = int(out_channels)
        self.strides = dict(STRIDES)
        self.fpn = FeaturePyramidNetwork(
            _stage_channels(trunk),
            self.out_channels,
            extra_blocks=LastLevelP6P7(self.out_channels, self.out_channels),  # P6 from P5
        )
        self.freeze_at = freeze_at
        self._freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg: ModelConfig, load_pretrained: bool = True) -> BackboneFPN:
        """``load_pretrained=False``: ignore ``backbone.pretrained`` (weights come from a checkpoint)."""
        b = cfg.backbone
        return cls(b.name, cfg.fpn_channels, b.freeze_at, b.pretrained if load_pretrained else None,
                   b.stride_in_1x1, tuple(b.deform_on_per_stage), b.deform_modulated, b.deform_interval,
                   b.deform_num_groups)

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
