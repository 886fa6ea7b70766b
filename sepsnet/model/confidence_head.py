"""Confidence head (paper Sec. III-G, Fig. 7): predicted mask IoU and silhouette score.

Input per instance (detached in training): RoIAlign of P3 to 14x14 (scale 1/8, aligned),
the 56x56 crops of all bases (K blend bases + silhouette basis) resized to 14x14, and the
mask probabilities resized to 14x14. Four 3x3 convs 256 -> 128 -> 32 -> 8 (the last with
stride 2) with ReLU, flatten 8x7x7, FC 56, ReLU, FC 2. Both outputs pass a sigmoid; the
loss is MSE against the IoU of the binarised mask with its target and the Dice score
(Eq. 1) of both binarised silhouettes. At inference silhouette_score = sqrt(sigmoid(raw)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from sepsnet.config import ModelConfig
from sepsnet.model.mask_losses import mask_silhouette_target
from sepsnet.model.silhouette import dice_score


class ConfidenceHead(nn.Module):
    """Predicts (IoU, silhouette) logits (n,2) for each instance mask."""

    def __init__(self, fpn_channels: int, num_bases_out: int, roi_size: int = 14, mask_size: int = 56,
                 sampling_ratio: int = 1, loss_weight: float = 1.0) -> None:
        """``num_bases_out``: channels of the basis head's output (K blend bases + silhouette basis)."""
        super().__init__()
        self.roi = roi_size
        self.mask_size = mask_size
        self.sampling_ratio = sampling_ratio
        cin = fpn_channels + num_bases_out + 1
        self.convs = nn.Sequential(
            nn.Conv2d(cin, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        side = (self.roi + 1) // 2
        self.fc = nn.Sequential(nn.Linear(8 * side * side, 56), nn.ReLU(inplace=True), nn.Linear(56, 2))
        self.w = loss_weight

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ConfidenceHead:
        b = cfg.blender
        n_bases = b.num_bases + (1 if cfg.components.silhouette_feature else 0)
        return cls(cfg.fpn_channels, n_bases, cfg.heads.confidence_roi_size, b.mask_size, b.sampling_ratio,
                   cfg.loss_weights.confidence)

    def forward(self, p3: Tensor, bases: Tensor, rois: Tensor, mask_probs: Tensor) -> Tensor:
        """p3 (N,C,H/8,W/8), bases (N,K+B,H/4,W/4), rois (n,5), mask_probs (n,R,R) -> raw (n,2)."""
        s = (self.roi, self.roi)
        r = rois.to(p3.dtype)
        f_p3 = roi_align(p3, r, s, 0.125, self.sampling_ratio, aligned=True)
        f_b = roi_align(bases, r, (self.mask_size, self.mask_size), 0.25, self.sampling_ratio,
                        aligned=True)
        f_b = F.interpolate(f_b, size=s, mode="bilinear", align_corners=False)
        f_m = F.interpolate(mask_probs[:, None].to(p3.dtype), size=s, mode="bilinear",
                            align_corners=False)
        x = self.convs(torch.cat([f_p3, f_b, f_m], dim=1))
        return self.fc(x.flatten(1))

    @staticmethod
    def scores(raw: Tensor) -> tuple[Tensor, Tensor]:
        """Inference scores: iou = sigmoid(raw0), silhouette = sqrt(sigmoid(raw1))."""
        return torch.sigmoid(raw[:, 0]), torch.sigmoid(raw[:, 1]).sqrt()

    @staticmethod
    @torch.no_grad()
    def targets(mask_probs: Tensor, gt: Tensor) -> Tensor:
        """(n,2) targets: IoU of (probs > 0.5) with gt, Dice of their binarised silhouettes."""
        pred = (mask_probs > 0.5).to(torch.float32)
        inter = (pred * gt).flatten(1).sum(1)
        union = ((pred + gt) > 0).to(torch.float32).flatten(1).sum(1)
        iou = inter / union.clamp(min=1.0)
        sil = dice_score(mask_silhouette_target(pred), mask_silhouette_target(gt))
        return torch.stack([iou, sil], dim=1)

    def loss(self, raw: Tensor, targets: Tensor) -> Tensor:
        """Weighted L2 (MSE) of sigmoid(raw) against the targets."""
        if raw.shape[0] == 0:
            return raw.sum() * 0.0
        return F.mse_loss(torch.sigmoid(raw), targets) * self.w
