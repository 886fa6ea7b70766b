"""FCOS losses (paper Sec. III-C via BlendMask/FCOS, AdelaiDet normalisation).

- classification: sigmoid focal loss (``focal_alpha``, ``focal_gamma``), summed over all locations
  and classes, divided by max(number of positives averaged over DDP workers, 1);
- box: GIoU loss of the decoded predicted vs. ground-truth boxes of the positives,
  weighted by the centerness targets and divided by their (DDP-averaged) sum;
- centerness: BCE with logits against the centerness targets of the positives, divided
  like the classification loss.
Each is multiplied by its weight (``model.loss_weights.fcos_cls/box/ctr``). :class:`FCOSLoss` takes
every value explicitly; :meth:`FCOSLoss.from_config` is the one place that reads them from the config
(detectron2's ``from_config`` pattern, like the heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from sepsnet.config import ModelConfig
from sepsnet.model.fcos_targets import compute_targets


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """[(N,C,h,w)] per level -> (N,L,C), row-major (y, x) within a level, P3..P7."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


def _ddp_mean(x: Tensor) -> Tensor:
    """Average a scalar over DDP workers (identity without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x = x / torch.distributed.get_world_size()
    return x


@dataclass(frozen=True)
class FCOSLoss:
    """The three FCOS losses and the positives, with explicit settings (module docstring)."""

    num_classes: int
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    sizes_of_interest: tuple[float, ...] = (64, 128, 256, 512)
    center_sample_radius: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    weight_cls: float = 1.0
    weight_box: float = 1.0
    weight_ctr: float = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FCOSLoss:
        """``model.fcos`` (targets, focal loss), ``model.num_thing_classes``, ``model.loss_weights.fcos_*``."""
        f, w = cfg.fcos, cfg.loss_weights
        return cls(num_classes=cfg.num_thing_classes, strides=tuple(f.strides),
                   sizes_of_interest=tuple(float(s) for s in f.sizes_of_interest),
                   center_sample_radius=f.center_sample_radius, focal_alpha=f.focal_alpha,
                   focal_gamma=f.focal_gamma, weight_cls=w.fcos_cls, weight_box=w.fcos_box, weight_ctr=w.fcos_ctr)

    def __call__(self, outputs: dict[str, list[Tensor]], locations: list[Tensor],
                 targets: list[dict]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted ``loss_fcos_cls/box/ctr`` and the positives the mask branch trains on.

        ``positives``: ``batch_index`` (P,), ``gt_index`` (P,), ``labels`` (P,), ``attention``
        (P,K*M*M), ``centerness_target`` (P,), ``pred_boxes`` (P,4) xyxy, ``level`` (P,) 0..4 (P3..P7),
        ordered by image, then level, then row-major location.
        """
        cls = _flatten_levels(outputs["cls_logits"]).float()  # (N,L,T)
        reg = _flatten_levels(outputs["bbox_reg"]).float()  # (N,L,4)
        ctr = _flatten_levels(outputs["centerness"]).float().squeeze(-1)  # (N,L)
        attn = _flatten_levels(outputs["attention"])  # (N,L,KMM)
        n_img, n_loc, n_cls = cls.shape
        if n_cls != self.num_classes:
            raise ValueError(f"FCOSLoss: the head predicts {n_cls} classes, the loss was built for {self.num_classes}")
        if len(targets) != n_img:
            raise ValueError(f"FCOSLoss: {len(targets)} target dicts for a batch of {n_img} images")
        per_image = compute_targets(locations, targets, strides=self.strides, sizes_of_interest=self.sizes_of_interest,
                                    num_classes=self.num_classes, center_sample_radius=self.center_sample_radius)
        labels = torch.stack([t.labels for t in per_image])  # (N,L)
        reg_t = torch.stack([t.reg_targets for t in per_image])
        ctr_t = torch.stack([t.centerness for t in per_image])
        gt_idx = torch.stack([t.gt_index for t in per_image])
        level = torch.repeat_interleave(
            torch.arange(len(locations), device=cls.device),
            torch.tensor([int(l.shape[0]) for l in locations], device=cls.device))

        pos = labels != n_cls  # (N,L)
        num_pos = _ddp_mean(pos.sum().float())
        norm = num_pos.clamp(min=1.0)

        onehot = F.one_hot(labels.reshape(-1), n_cls + 1)[:, :n_cls].to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls.reshape(-1, n_cls), onehot, alpha=self.focal_alpha,
                                      gamma=self.focal_gamma, reduction="sum") / norm

        batch_index, loc_index = pos.nonzero(as_tuple=True)
        loc = torch.cat(locations, dim=0).to(reg.dtype)[loc_index]  # (P,2)
        p_reg, p_reg_t, p_ctr, p_ctr_t = reg[pos], reg_t[pos], ctr[pos], ctr_t[pos]
        pred_boxes = torch.cat([loc - p_reg[:, :2], loc + p_reg[:, 2:]], dim=1)
        ctr_norm = _ddp_mean(p_ctr_t.sum()).clamp(min=1e-6)  # every rank reduces, positives or not
        if p_reg.shape[0] > 0:
            gt_boxes = torch.cat([loc - p_reg_t[:, :2], loc + p_reg_t[:, 2:]], dim=1)
            giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
            loss_box = (giou * p_ctr_t).sum() / ctr_norm
            loss_ctr = F.binary_cross_entropy_with_logits(p_ctr, p_ctr_t, reduction="sum") / norm
        else:  # keep the graph connected so DDP and the optimiser see every parameter
            loss_box = reg.sum() * 0.0
            loss_ctr = ctr.sum() * 0.0
        losses = {
            "loss_fcos_cls": loss_cls * self.weight_cls,
            "loss_fcos_box": loss_box * self.weight_box,
            "loss_fcos_ctr": loss_ctr * self.weight_ctr,
        }
        positives = {
            "batch_index": batch_index,
            "gt_index": gt_idx[pos],
            "labels": labels[pos],
            "attention": attn[pos],
            "centerness_target": p_ctr_t,
            "pred_boxes": pred_boxes,
            "level": level[loc_index],
        }
        return losses, positives
