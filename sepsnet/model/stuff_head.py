"""Stuff head (paper Sec. III-C, Fig. 3): P2..P5 -> (S+1)-class stuff logits at 1/4 scale.

P3..P5 are resized bilinearly to the P2 size and added element-wise; a conv tower
(3x3 conv, GroupNorm, ReLU) follows, then a 1x1 classifier with S stuff classes plus one
"thing" class. A train-only auxiliary 1x1 conv predicts the stuff silhouette
(``components.silhouette_stuff``); it is never built with ``deploy=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepsnet.config import ModelConfig
from sepsnet.model.fcos_head import group_norm_groups
from sepsnet.model.silhouette import IGNORE, dice_loss, stuff_silhouette


def conv_tower(in_ch: int, ch: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, GroupNorm, ReLU); the first maps ``in_ch`` -> ``ch``."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_ch if i == 0 else ch, ch, 3, padding=1, bias=False),
                   nn.GroupNorm(group_norm_groups(ch), ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def merge_levels(feats: list[Tensor]) -> Tensor:
    """Resize every level bilinearly to the first one's size and add them (Fig. 3/5)."""
    out = feats[0]
    size = feats[0].shape[-2:]
    for f in feats[1:]:
        out = out + F.interpolate(f, size=size, mode="bilinear", align_corners=False)
    return out


class StuffHead(nn.Module):
    """Stuff segmentation with the auxiliary silhouette output (Sec. III-C)."""

    def __init__(self, cfg: ModelConfig, deploy: bool = False) -> None:
        super().__init__()
        h = cfg.heads
        c = h.stuff_channels
        self.num_classes = cfg.num_stuff_classes + 1
        self.tower = conv_tower(cfg.fpn_channels, c, max(h.stuff_num_convs, 1))
        self.classifier = nn.Conv2d(c, self.num_classes, 1)
        self.silhouette: nn.Module | None = None
        if cfg.components.silhouette_stuff and not deploy:
            self.silhouette = nn.Conv2d(c, 1, 1)
        self.w_stuff = cfg.loss_weights.stuff
        self.w_sil = cfg.loss_weights.stuff_silhouette

    def forward(self, feats: list[Tensor], aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """[P2..P5] -> (logits (N,S+1,h2,w2), silhouette logits (N,1,h2,w2) or None);
        ``aux=False`` (inference) never runs the auxiliary branch."""
        x = self.tower(merge_levels(feats))
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
