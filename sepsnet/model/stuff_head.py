"""Stuff head (paper Sec. III-C, Fig. 3): P2..P5 -> (S+1)-class stuff logits at 1/4 scale.

Panoptic FPN's semantic head, the layout of the authors' code (SE-PSNet ``panoptic_module``):
each level P_l gets max(1, l - 2) blocks of (3x3 conv without bias, GroupNorm, ReLU), each block of
a level above P2 followed by a bilinear 2x upsampling (to the next finer level's size, so odd
input sizes work); the four 1/4-scale maps are added and a 1x1 classifier gives S stuff classes
plus one "thing" class (index S). A train-only auxiliary 3x3 conv predicts the stuff silhouette
(``components.silhouette_stuff``); it is never built with ``deploy=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepsnet.config import ModelConfig
from sepsnet.model.fcos_head import group_norm_groups
from sepsnet.model.silhouette import IGNORE, dice_loss, stuff_silhouette


def _gn_block(in_ch: int, ch: int) -> nn.Sequential:
    """3x3 conv (no bias), GroupNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1, bias=False),
                         nn.GroupNorm(group_norm_groups(ch), ch), nn.ReLU(inplace=True))


class StuffHead(nn.Module):
    """Stuff segmentation with the auxiliary silhouette output (Sec. III-C)."""

    def __init__(self, in_channels: int, channels: int, num_stuff_classes: int, silhouette: bool = True,
                 stuff_weight: float = 1.0, silhouette_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_stuff_classes + 1
        # P2: 1 block; P3: 1; P4: 2; P5: 3 (Panoptic FPN: one block per 2x upsampling, at least one)
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(_gn_block(in_channels if k == 0 else channels, channels) for k in range(max(1, lvl)))
            for lvl in range(4))
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)
        self.silhouette: nn.Module | None = nn.Conv2d(channels, 1, 3, padding=1) if silhouette else None
        self.w_stuff = stuff_weight
        self.w_sil = silhouette_weight

    @classmethod
    def from_config(cls, cfg: ModelConfig, deploy: bool = False) -> StuffHead:
        return cls(cfg.fpn_channels, cfg.heads.stuff_channels, cfg.num_stuff_classes,
                   cfg.components.silhouette_stuff and not deploy, cfg.loss_weights.stuff,
                   cfg.loss_weights.stuff_silhouette)

    def features(self, feats: list[Tensor]) -> Tensor:
        """[P2..P5] -> the summed 1/4-scale feature map (N,C,h2,w2)."""
        sizes = [f.shape[-2:] for f in feats]
        out = None
        for lvl, (feat, blocks) in enumerate(zip(feats, self.scale_heads)):
            x = feat
            for k, block in enumerate(blocks):
                x = block(x)
                if lvl > 0:  # 2x up to the next finer level
                    x = F.interpolate(x, size=sizes[lvl - 1 - k], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return out

    def forward(self, feats: list[Tensor], aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """[P2..P5] -> (logits (N,S+1,h2,w2), silhouette logits (N,1,h2,w2) or None);
        ``aux=False`` (inference) never runs the auxiliary branch."""
        x = self.features(feats)
        sil = self.silhouette(x) if aux and self.silhouette is not None else None
        return self.classifier(x), sil

    def losses(self, logits: Tensor, sil: Tensor | None, stuff: Tensor) -> dict[str, Tensor]:
        """CE (ignore 255) at input resolution, and the Dice silhouette loss (Eq. 2) at 1/4.

        ``stuff``: (N,H,W) int64 stuff targets (INTERFACES.md)."""
        up = F.interpolate(logits, size=stuff.shape[-2:], mode="bilinear", align_corners=False)
        if bool((stuff != IGNORE).any()):
            ce = F.cross_entropy(up, stuff, ignore_index=IGNORE)
        else:
            ce = up.sum() * 0.0
        out = {"loss_stuff": ce * self.w_stuff}
        if sil is not None:
            edges, valid = stuff_silhouette(stuff, tuple(sil.shape[-2:]))
            loss = dice_loss(torch.sigmoid(sil[:, 0]), edges, valid)
            out["loss_stuff_silhouette"] = loss * self.w_sil
        return out
