"""The one list of backbones (torch-free, so config validation can read it).

Each entry names the torchvision constructor of the trunk and the facts the weight loaders
need: bottleneck or basic blocks, blocks per stage (the detectron2 depth), groups and width
per group (ResNeXt). ``sepsnet.model.backbone`` builds from it and ``sepsnet.config`` validates
``model.backbone.name`` against it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """One trunk: torchvision builder name and its shape facts."""

    torchvision_fn: str
    blocks: tuple[int, int, int, int]  # blocks in res2..res5
    bottleneck: bool
    groups: int = 1
    width_per_group: int = 64


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", (2, 2, 2, 2), bottleneck=False),
    "resnet34": BackboneSpec("resnet34", (3, 4, 6, 3), bottleneck=False),
    "resnet50": BackboneSpec("resnet50", (3, 4, 6, 3), bottleneck=True),
    "resnet101": BackboneSpec("resnet101", (3, 4, 23, 3), bottleneck=True),
    "resnext50_32x4d": BackboneSpec("resnext50_32x4d", (3, 4, 6, 3), bottleneck=True, groups=32, width_per_group=4),
    "resnext101_32x8d": BackboneSpec("resnext101_32x8d", (3, 4, 23, 3), bottleneck=True, groups=32,
                                     width_per_group=8),
}


def backbone_for(blocks: tuple[int, ...], bottleneck: bool, groups: int, width_per_group: int) -> str | None:
    """The registry name with these shape facts, or None."""
    for name, spec in BACKBONES.items():
        if (spec.blocks, spec.bottleneck, spec.groups, spec.width_per_group) == (
                tuple(blocks), bottleneck, groups, width_per_group):
            return name
    return None
