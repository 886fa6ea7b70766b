"""Mask-branch losses ("Mask Loss" and "Mask Aux" of Table I; DESIGN.md facts).

- targets: the ground-truth masks cropped by RoIAlign with the ground-truth boxes to R x R
  (aligned) and thresholded at 0.5;
- BCE per instance, weighted by the FCOS centerness target (BlendMask);
- soft Jaccard 1 - sum(pg) / (sum p^2 + sum g^2 - sum pg + 1e-5), weight w;
- silhouette Dice (Eq. 1-2) between the Laplacian of sigmoid(logits) (clamped to [0,1]) and
  the binarised Laplacian (> 0: inner boundary ring) of the target, weight 0.5 w.
  With ``components.mask_loss`` off: BCE only.
- Mask aux: 3x3 conv (1->1), ReLU, 1x1 conv on the mask logits -> silhouette logits, Dice.

:class:`MaskLoss` takes the switches and weights explicitly; :meth:`MaskLoss.from_config` is the one
place that reads them from the config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from sepsnet.config import ModelConfig
from sepsnet.model.silhouette import dice_loss, mask_silhouette, soft_silhouette


def mask_targets(masks: Tensor, rois: Tensor, size: int) -> Tensor:
    """masks (G,H,W) of all images stacked, rois (n,5) [gt row in ``masks``, x1,y1,x2,y2]
    -> binary float (n,size,size) targets (RoIAlign aligned, adaptive sampling, > 0.5)."""
    crops = roi_align(masks[:, None].to(torch.float32), rois.to(torch.float32), (size, size),
                      1.0, 0, aligned=True)
    return (crops[:, 0] > 0.5).to(torch.float32)


def mask_silhouette_target(targets: Tensor) -> Tensor:
    """Binarised Laplacian (lap > 0, replicate padding) of binary masks (n,R,R): the inner
    boundary ring. One-sided on purpose: the raw Laplacian of sigmoid(logits) is positive
    there and negative outside, and the 1-channel ReLU mask aux can only fit one side."""
    return mask_silhouette(targets)


def soft_jaccard(prob: Tensor, gt: Tensor) -> Tensor:
    """Per-instance soft Jaccard loss 1 - sum(pg) / (sum p^2 + sum g^2 - sum pg + 1e-5)."""
    p, g = prob.float().flatten(1), gt.float().flatten(1)
    inter = (p * g).sum(1)
    return 1.0 - inter / ((p * p).sum(1) + (g * g).sum(1) - inter + 1e-5)


class MaskAux(nn.Module):
    """Mask aux (Sec. III-F): two convs on the mask logits predicting the silhouette."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        # start as an edge detector (Laplacian of the logits, inner side), not from noise: with a
        # single channel a random start learns slowly and the aux signal would be noise early on
        with torch.no_grad():
            self.conv1.weight.fill_(-1.0)
            self.conv1.weight[0, 0, 1, 1] = 8.0
            self.conv1.bias.zero_()
            self.conv2.weight.fill_(1.0)
            self.conv2.bias.fill_(-2.0)

    def forward(self, mask_logits: Tensor) -> Tensor:
        """(n,R,R) -> silhouette logits (n,R,R)."""
        return self.conv2(F.relu(self.conv1(mask_logits[:, None])))[:, 0]


@dataclass(frozen=True)
class MaskLoss:
    """Weighted mask losses (module docstring). ``jaccard_silhouette``: ``components.mask_loss`` (soft
    Jaccard + silhouette Dice besides the BCE); the aux loss is computed when aux logits are given."""

    jaccard_silhouette: bool = True
    weight_bce: float = 1.0
    weight_iou: float = 1.0  # w; the silhouette Dice on the mask gets 0.5 w
    weight_aux: float = 0.3

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MaskLoss:
        """``model.components.mask_loss`` and ``model.loss_weights.mask_bce/mask_iou/mask_aux``."""
        w = cfg.loss_weights
        return cls(jaccard_silhouette=cfg.components.mask_loss, weight_bce=w.mask_bce, weight_iou=w.mask_iou,
                   weight_aux=w.mask_aux)

    def __call__(self, logits: Tensor, targets: Tensor, weights: Tensor,
                 aux_logits: Tensor | None = None) -> dict[str, Tensor]:
        """n instances: logits/targets (n,R,R), weights (n,) centerness, aux_logits (n,R,R) or None."""
        zero = logits.sum() * 0.0
        out: dict[str, Tensor] = {}
        if logits.shape[0] == 0:
            out["loss_mask_bce"] = zero
            if self.jaccard_silhouette:
                out["loss_mask_iou"] = zero
                out["loss_mask_silhouette"] = zero
            if aux_logits is not None:
                out["loss_mask_aux"] = zero + aux_logits.sum() * 0.0
            return out
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(1, 2))
        out["loss_mask_bce"] = (bce * weights).sum() / weights.sum().clamp(min=1e-6) * self.weight_bce
        sil_gt = None
        if self.jaccard_silhouette or aux_logits is not None:
            sil_gt = mask_silhouette_target(targets)
        if self.jaccard_silhouette:
            prob = torch.sigmoid(logits)
            out["loss_mask_iou"] = soft_jaccard(prob, targets).mean() * self.weight_iou
            pred_sil = soft_silhouette(prob[:, None])[:, 0]
            out["loss_mask_silhouette"] = dice_loss(pred_sil, sil_gt) * (0.5 * self.weight_iou)
        if aux_logits is not None:
            out["loss_mask_aux"] = dice_loss(torch.sigmoid(aux_logits), sil_gt) * self.weight_aux
        return out
