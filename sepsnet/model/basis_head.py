"""Basis head (paper Sec. III-E, Fig. 5): P3..P5 -> K blend bases (+1 silhouette basis) at 1/4.

P4 and P5 are resized bilinearly to P3 and added; a conv tower follows, a bilinear 2x
upsampling to the P2 size (1/4 of the input), one more 3x3 conv and a 1x1 conv to K bases
plus, with ``components.silhouette_feature``, one silhouette basis trained with the Dice
loss against the full panoptic silhouette. A train-only auxiliary head on P3 (3x3 conv,
ReLU, 1x1 conv) predicts thing semantics (T+1 classes, 0 = background) at 1/8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepsnet.config import ModelConfig
from sepsnet.model.fcos_head import group_norm_groups
from sepsnet.model.silhouette import IGNORE, dice_loss, panoptic_silhouette, resize_ids
from sepsnet.model.stuff_head import conv_tower, merge_levels


def thing_class_map(masks: Tensor, classes: Tensor, stuff: Tensor) -> Tensor:
    """(H,W) int64: class+1 under an instance mask, 0 elsewhere, 255 on ignored non-mask pixels."""
    out = torch.zeros(stuff.shape, dtype=torch.int64, device=stuff.device)
    for g in range(masks.shape[0]):
        out = torch.where(masks[g].bool(), classes[g].to(torch.int64) + 1, out)
    ignored = (stuff == IGNORE) & (out == 0)
    return torch.where(ignored, torch.full_like(out, IGNORE), out)


class BasisHead(nn.Module):
    """ProtoNet-style basis module with the silhouette basis (Sec. III-E)."""

    def __init__(self, cfg: ModelConfig, deploy: bool = False) -> None:
        super().__init__()
        h = cfg.heads
        c = h.basis_channels
        self.num_bases = cfg.blender.num_bases
        self.num_sil = 1 if cfg.components.silhouette_feature else 0
        self.tower = conv_tower(cfg.fpn_channels, c, max(h.basis_num_convs, 1))
        self.refine = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False),
                                    nn.GroupNorm(group_norm_groups(c), c), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(c, self.num_bases + self.num_sil, 1)
        self.semantic: nn.Module | None = None
        if not deploy:
            f = cfg.fpn_channels
            self.semantic = nn.Sequential(nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True),
                                          nn.Conv2d(f, cfg.num_thing_classes + 1, 1))
        self.w_sil = cfg.loss_weights.basis_silhouette
        self.w_sem = cfg.loss_weights.basis_aux_semantic

    def forward(self, feats: list[Tensor], p2: Tensor,
                aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """[P3,P4,P5], P2 (for the output size) -> (bases (N,K+B,h2,w2), semantic logits or None);
        ``aux=False`` (inference) never runs the auxiliary semantic branch."""
        x = self.tower(merge_levels(feats))
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
