"""Deformable 3x3 convolutions in the ResNet trunk (detectron2 ``DeformBottleneckBlock``, AdelaiDet's
``*_dcni3_*`` BlendMask configs); see docs/DESIGN.md "Deformable convolutions".

Facts carried over from detectron2 / AdelaiDet (``MODEL.RESNETS.DEFORM_*``):

- ``DEFORM_ON_PER_STAGE`` [res2, res3, res4, res5]: stages whose bottlenecks get a deformable 3x3 conv;
- ``DEFORM_INTERVAL`` k: within such a stage, block i is deformable when ``i % k == 0`` (AdelaiDet's
  ``resnet_interval`` backbone; k = 1 is detectron2's every block);
- the offsets come from a 3x3 conv with bias (``conv2_offset``, zero-initialised, same stride and
  padding as the 3x3 conv) with 18 x ``DEFORM_NUM_GROUPS`` outputs, or 27 x groups when
  ``DEFORM_MODULATED``: then the first two thirds are the offsets and the sigmoid of the last third is
  the modulation mask (DCNv2). The offset layout, (dy, dx) per kernel tap and group, is the one of
  :func:`torchvision.ops.deform_conv2d`.

Here the deformable conv keeps the name of the plain 3x3 conv it replaces (``conv2.weight``, so
ImageNet trunks and checkpoints load unchanged) and owns its offset conv (``conv2.offset.*``).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d

#: offset-conv outputs per deformable group: 2 x 3 x 3 offsets, plus 3 x 3 mask logits when modulated
OFFSETS_PER_GROUP = 18
MODULATED_PER_GROUP = 27


class OffsetDeformConv2d(DeformConv2d):
    """A 3x3 deformable conv (no bias) that predicts its own offsets (and mask) from its input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 modulated: bool = False, offset_groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                         groups=groups, bias=False)
        self.modulated = bool(modulated)
        per_group = MODULATED_PER_GROUP if modulated else OFFSETS_PER_GROUP
        self.offset = nn.Conv2d(in_channels, per_group * offset_groups, 3, stride=stride, padding=dilation,
                                dilation=dilation)
        nn.init.zeros_(self.offset.weight)  # start as the plain conv (detectron2 does the same)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.offset(x)
        if self.modulated:
            split = out.shape[1] * 2 // 3
            return deform_conv2d(x, out[:, :split], self.weight, None, self.stride, self.padding, self.dilation,
                                 mask=out[:, split:].sigmoid())
        return deform_conv2d(x, out, self.weight, None, self.stride, self.padding, self.dilation)


def deformable_blocks(on_per_stage: Sequence[bool], interval: int, blocks: Sequence[int]) -> list[tuple[int, int]]:
    """(stage index 0..3 = res2..res5, block index) of every deformable block."""
    return [(s, i) for s, (on, n) in enumerate(zip(on_per_stage, blocks)) if on
            for i in range(n) if i % interval == 0]


def make_deformable(layers: Sequence[nn.Module], on_per_stage: Sequence[bool], interval: int = 1,
                    modulated: bool = False, offset_groups: int = 1) -> list[str]:
    """Replace the 3x3 conv of the chosen bottlenecks of ``layers`` (torchvision layer1..layer4) by an
    :class:`OffsetDeformConv2d` with the same shape, stride and groups; returns the replaced names."""
    replaced = []
    blocks = [len(layer) for layer in layers]  # type: ignore[arg-type]
    for s, i in deformable_blocks(on_per_stage, interval, blocks):
        block = layers[s][i]  # type: ignore[index]
        conv = block.conv2
        if not hasattr(block, "conv3") or not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            raise ValueError(f"layer{s + 1}.{i} is not a bottleneck with a 3x3 conv2")
        block.conv2 = OffsetDeformConv2d(conv.in_channels, conv.out_channels, stride=conv.stride[0],
                                         dilation=conv.dilation[0], groups=conv.groups, modulated=modulated,
                                         offset_groups=offset_groups)
        replaced.append(f"layer{s + 1}.{i}.conv2")
    return replaced


def has_deform(on_per_stage: Sequence[bool]) -> bool:
    """Whether a backbone with these stage switches holds deformable convolutions."""
    return any(on_per_stage)
