"""Basis head (paper Sec. III-E, Fig. 5): P3..P5 -> K blend bases (+1 silhouette basis) at 1/4.

The layout of the authors' ProtoNet basis module (SE-PSNet / AdelaiDet ``basis_module``): each of
P3, P4, P5 passes one (3x3 conv, norm, ReLU) block to ``channels``; P4 and P5 are resized
bilinearly to P3 and added; ``num_convs`` more blocks, a bilinear 2x upsampling to the P2 size
(1/4 of the input), one more block and a 1x1 conv to K bases plus, with
``components.silhouette_feature``, one silhouette basis trained with the Dice loss against the
full panoptic silhouette. The norm is GroupNorm (SE-PSNet) or BatchNorm (AdelaiDet BlendMask).
A train-only auxiliary head on P3 (two blocks, 1x1 conv) predicts thing semantics (T+1 classes,
0 = background) at 1/8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepsnet.config import ModelConfig
from sepsnet.model.fcos_head import group_norm_groups
from sepsnet.model.silhouette import IGNORE, dice_loss, panoptic_silhouette, resize_ids


def thing_class_map(masks: Tensor, classes: Tensor, stuff: Tensor) -> Tensor:
    """(H,W) int64: class+1 under an instance mask, 0 elsewhere, 255 on ignored non-mask pixels."""
    out = torch.zeros(stuff.shape, dtype=torch.int64, device=stuff.device)
    for g in range(masks.shape[0]):
        out = torch.where(masks[g].bool(), classes[g].to(torch.int64) + 1, out)
    ignored = (stuff == IGNORE) & (out == 0)
    return torch.where(ignored, torch.full_like(out, IGNORE), out)


def norm_block(in_ch: int, ch: int, norm: str = "GN") -> nn.Sequential:
    """3x3 conv (no bias), GroupNorm or BatchNorm, ReLU."""
    layer = nn.GroupNorm(group_norm_groups(ch), ch) if norm == "GN" else nn.BatchNorm2d(ch)
    return nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True))


class BasisHead(nn.Module):
    """ProtoNet-style basis module with the silhouette basis (Sec. III-E)."""

    def __init__(self, in_channels: int, channels: int, num_bases: int, num_convs: int = 3,
                 silhouette_basis: bool = True, num_thing_classes: int | None = None, norm: str = "GN",
                 silhouette_weight: float = 1.0, semantic_weight: float = 1.0) -> None:
        """``num_thing_classes``: build the train-only semantic branch (None: not built)."""
        super().__init__()
        self.num_bases = num_bases
        self.num_sil = 1 if silhouette_basis else 0
        self.lateral = nn.ModuleList(norm_block(in_channels, channels, norm) for _ in range(3))
        self.tower = nn.Sequential(*[norm_block(channels, channels, norm) for _ in range(num_convs)])
        self.refine = norm_block(channels, channels, norm)
        self.out = nn.Conv2d(channels, self.num_bases + self.num_sil, 1)
        self.semantic: nn.Module | None = None
        if num_thing_classes is not None:
            self.semantic = nn.Sequential(norm_block(in_channels, channels, norm), norm_block(channels, channels, norm),
                                          nn.Conv2d(channels, num_thing_classes + 1, 1))
        self.w_sil = silhouette_weight
        self.w_sem = semantic_weight

    @classmethod
    def from_config(cls, cfg: ModelConfig, deploy: bool = False) -> BasisHead:
        h = cfg.heads
        return cls(cfg.fpn_channels, h.basis_channels, cfg.blender.num_bases, h.basis_num_convs,
                   cfg.components.silhouette_feature, None if deploy else cfg.num_thing_classes, h.basis_norm,
                   cfg.loss_weights.basis_silhouette, cfg.loss_weights.basis_aux_semantic)

    def forward(self, feats: list[Tensor], p2: Tensor,
                aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """[P3,P4,P5], P2 (for the output size) -> (bases (N,K+B,h2,w2), semantic logits or None);
        ``aux=False`` (inference) never runs the auxiliary semantic branch."""
        x = self.lateral[0](feats[0])
        for block, f in zip(self.lateral[1:], feats[1:]):
            x = x + F.interpolate(block(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.tower(x)
        x = F.interpolate(x, size=p2.shape[-2:], mode="bilinear", align_corners=False)
        bases = self.out(self.refine(x))
        sem = self.semantic(feats[0]) if aux and self.semantic is not None else None
        return bases, sem

    def losses(self, bases: Tensor, sem: Tensor | None, targets: list[dict]) -> dict[str, Tensor]:
        """Dice (Eq. 2) of sigmoid(silhouette basis) vs the panoptic silhouette at 1/4;
        CE of the thing-semantic logits vs the thing-class map at 1/8 (ignore 255)."""
        out: dict[str, Tensor] = {}
        if self.num_sil:
            size = tuple(bases.shape[-2:])
            sils = [panoptic_silhouette(t["masks"], t["stuff"], size) for t in targets]
            edges = torch.stack([s[0] for s in sils])
            valid = torch.stack([s[1] for s in sils])
            pred = torch.sigmoid(bases[:, self.num_bases])
            out["loss_basis_silhouette"] = dice_loss(pred, edges, valid) * self.w_sil
        if sem is not None:
            size = tuple(sem.shape[-2:])
            maps = torch.stack([resize_ids(thing_class_map(t["masks"], t["classes"], t["stuff"]), size)
                                for t in targets])
            if bool((maps != IGNORE).any()):
                ce = F.cross_entropy(sem, maps, ignore_index=IGNORE)
            else:
                ce = sem.sum() * 0.0
            out["loss_basis_semantic"] = ce * self.w_sem
        return out
