"""FCOS target assignment (paper Sec. III-C follows BlendMask/FCOS; AdelaiDet defaults).

A location is a positive for a ground-truth box when
1. it lies in the box's centre region: a square of half-side ``radius * stride`` around
   the box centre, clipped to the box (``center_sample_radius <= 0``: anywhere in the box);
2. ``max(l, t, r, b)`` to the box is inside the level's size-of-interest range
   ``[lo, hi]`` (ranges [-1,s0],[s0,s1],...,[s3,inf] from ``sizes_of_interest``);
and when several boxes qualify, the one with the smallest area wins (first one on ties).
Everything is computed as (L, G) matrices per image: no loop over locations. The functions take
explicit values; :class:`sepsnet.model.fcos_loss.FCOSLoss` reads them from the config.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sepsnet.errors import DataError

INF = 1.0e8


@dataclass
class FCOSTargets:
    """Targets for the L concatenated locations of one image."""

    labels: Tensor  # int64 (L,), T = background
    reg_targets: Tensor  # float32 (L,4) l,t,r,b in input pixels (0 for negatives)
    centerness: Tensor  # float32 (L,) sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)); 0 for negatives
    gt_index: Tensor  # int64 (L,) index into the image's boxes, -1 for negatives


def level_tables(locations: list[Tensor], strides: Sequence[int],
                 sizes_of_interest: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated (L,2) locations, (L,) stride and (L,2) size-of-interest range per location."""
    strides = [int(s) for s in strides]
    soi = [float(s) for s in sizes_of_interest]
    bounds = [-1.0] + soi + [INF]
    if len(locations) != len(strides) or len(bounds) != len(strides) + 1:
        raise ValueError(
            f"FCOS targets: {len(locations)} levels, {len(strides)} strides and "
            f"{len(soi)} sizes_of_interest do not fit together (need 5, 5, 4)"
        )
    device = locations[0].device
    loc = torch.cat(locations, dim=0).float()
    counts = [int(l.shape[0]) for l in locations]
    per_level = torch.tensor(counts, device=device)
    stride = torch.repeat_interleave(torch.tensor(strides, dtype=torch.float32, device=device), per_level)
    ranges = torch.tensor([[bounds[i], bounds[i + 1]] for i in range(len(strides))],
                          dtype=torch.float32, device=device)
    ranges = torch.repeat_interleave(ranges, per_level, dim=0)
    return loc, stride, ranges


def centerness_target(reg: Tensor) -> Tensor:
    """FCOS centerness of (P,4) l,t,r,b targets."""
    lr = reg[:, [0, 2]]
    tb = reg[:, [1, 3]]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-6)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-6))
    return ratio.clamp(min=0.0).sqrt()


def assign_image(loc: Tensor, stride: Tensor, ranges: Tensor, boxes: Tensor, classes: Tensor,
                 num_classes: int, radius: float) -> FCOSTargets:
    """Assign one image's gt ``boxes`` (G,4) xyxy / ``classes`` (G,) to ``loc`` (L,2)."""
    n_loc = loc.shape[0]
    device = loc.device
    if boxes.numel() == 0:
        return FCOSTargets(
            labels=torch.full((n_loc,), num_classes, dtype=torch.int64, device=device),
            reg_targets=torch.zeros((n_loc, 4), dtype=torch.float32, device=device),
            centerness=torch.zeros((n_loc,), dtype=torch.float32, device=device),
            gt_index=torch.full((n_loc,), -1, dtype=torch.int64, device=device),
        )
    xs, ys = loc[:, 0:1], loc[:, 1:2]  # (L,1)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]  # (G,)
    reg = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], dim=2)  # (L,G,4)
    if radius > 0:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = stride[:, None] * radius  # (L,1)
        cx1 = torch.maximum(cx - half, x1)
        cy1 = torch.maximum(cy - half, y1)
        cx2 = torch.minimum(cx + half, x2)
        cy2 = torch.minimum(cy + half, y2)
        inside = torch.stack([xs - cx1, ys - cy1, cx2 - xs, cy2 - ys], dim=2).min(dim=2).values > 0
    else:
        inside = reg.min(dim=2).values > 0
    max_reg = reg.max(dim=2).values  # (L,G)
    in_range = (max_reg >= ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])
    area = ((x2 - x1) * (y2 - y1))[None, :].expand(n_loc, -1).clone()
    area[~(inside & in_range)] = INF
    min_area, gt_index = area.min(dim=1)  # first minimum on ties
    negative = min_area >= INF
    reg_t = reg[torch.arange(n_loc, device=device), gt_index]  # (L,4)
    labels = classes.to(device=device, dtype=torch.int64)[gt_index]
    labels[negative] = num_classes
    gt_index[negative] = -1
    reg_t[negative] = 0.0
    ctr = centerness_target(reg_t)
    ctr[negative] = 0.0
    return FCOSTargets(labels=labels, reg_targets=reg_t, centerness=ctr, gt_index=gt_index)


def compute_targets(locations: list[Tensor], targets: list[dict], *, strides: Sequence[int],
                    sizes_of_interest: Sequence[float], num_classes: int,
                    center_sample_radius: float) -> list[FCOSTargets]:
    """FCOS targets for every image; ``targets[i]`` holds ``boxes`` (G,4) and ``classes`` (G,) in
    ``[0, num_classes)``."""
    loc, stride, ranges = level_tables(locations, strides, sizes_of_interest)
    out = []
    for i, t in enumerate(targets):
        if "boxes" not in t or "classes" not in t:
            raise DataError(f"FCOS targets: image {i} target lacks 'boxes' or 'classes' (keys {sorted(t)})")
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=loc.device).reshape(-1, 4)
        classes = torch.as_tensor(t["classes"], device=loc.device).reshape(-1)
        if boxes.shape[0] != classes.shape[0]:
            raise DataError(f"FCOS targets: image {i} has {boxes.shape[0]} boxes but {classes.shape[0]} classes")
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            raise DataError(f"FCOS targets: image {i} class ids must be in [0, {num_classes}), "
                            f"got {classes.tolist()[:10]}")
        out.append(assign_image(loc, stride, ranges, boxes, classes, num_classes, float(center_sample_radius)))
    return out
