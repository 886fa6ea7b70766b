"""Instance scoring (paper Eq. 4) and silhouette de-duplication (paper III-G).

Mask score (Eq. 4): ``alpha * FCOS score + (1 - alpha) * predicted IoU`` with alpha from
``cfg.postprocess.alpha`` (0.8). With the mask-score component off the confidence head
does not exist, ``iou_score`` is None and the FCOS score is used alone.

Silhouette de-duplication rule. The paper says the silhouette score "will be considered
only whenever two masks possibly belong to the same instance". We read "possibly the same
instance" as: same class AND IoU of the binary masks pasted in the image (original
resolution, after thresholding) above ``cfg.postprocess.dedup_iou``. Pasted masks are used
(not the 56x56 crops) because two crops live in different box frames; the image is the one
frame where their overlap is exact. Among such groups we keep the mask with the higher
predicted silhouette score, greedily like NMS keyed by the silhouette score: visit instances
by descending silhouette score; a visited instance that is still alive removes every
same-class instance whose mask IoU with it exceeds the threshold. Only pairs whose boxes
intersect are examined, and only inside the intersection of their boxes, so the cost is
proportional to the overlapping area, not to the image size. With no silhouette scores
(mask-score component off) nothing is removed.

Only instances that can enter the panoptic result take part (``eligible``: the pipeline
passes mask score >= ``postprocess.instance_score_thresh``). Otherwise a low-scoring twin
with a better silhouette score could remove a confident mask and then be dropped by the
fusion's score cut itself, losing the object altogether. Ineligible instances are kept
untouched (they still count for mask AP) and never remove anything.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.paste import PastedMasks


def mask_scores(fcos_score: torch.Tensor, iou_score: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Eq. 4: ``alpha * fcos + (1 - alpha) * iou``; ``fcos`` alone when ``iou_score`` is None."""
    if iou_score is None:
        return fcos_score
    if iou_score.shape != fcos_score.shape:
        raise ConfigError(f"mask_scores: iou_score shape {tuple(iou_score.shape)} != fcos_score "
                          f"shape {tuple(fcos_score.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"mask_scores: alpha must be in [0, 1], got {alpha}")
    return alpha * fcos_score + (1.0 - alpha) * iou_score


def silhouette_dedup(
    masks: torch.Tensor | PastedMasks,
    classes: torch.Tensor,
    silhouette_scores: torch.Tensor | None,
    iou_thresh: float,
    regions: torch.Tensor | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the instances kept by the rule in the module docstring.

    ``masks``: :class:`PastedMasks` (crops per box) or bool (n, h, w) planes; ``classes``: (n,);
    ``silhouette_scores``: (n,) or None (keep all). ``regions``: with planes, optional int (n, 4)
    [x0, y0, x1, y1) boxes that contain each mask (tight boxes when None).
    ``eligible``: optional bool (n,); only eligible instances are compared (default: all).
    """
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise ConfigError(f"silhouette_dedup: expected masks (n,h,w), got {tuple(masks.shape)}")
        masks = PastedMasks.from_dense(masks, regions)
    n = len(masks)
    device = classes.device
    if silhouette_scores is None or n < 2:
        return torch.arange(n, device=device)
    if classes.shape != (n,) or silhouette_scores.shape != (n,):
        raise ConfigError(f"silhouette_dedup: expected classes ({n},), scores ({n},); got "
                          f"{tuple(classes.shape)}, {tuple(silhouette_scores.shape)}")
    if eligible is not None and eligible.shape != (n,):
        raise ConfigError(f"silhouette_dedup: eligible must be ({n},), got {tuple(eligible.shape)}")
    ok = torch.ones(n, dtype=torch.bool, device=device) if eligible is None else eligible.to(device, torch.bool)
    # one transfer for the three per-instance values (float64 holds the classes and float32 scores exactly)
    meta = torch.stack([classes.double(), silhouette_scores.detach().double(), ok.double()], 1).cpu()
    keep = dedup_keep(masks, meta[:, 0].long().tolist(), meta[:, 1].tolist(), iou_thresh, meta[:, 2].bool().tolist())
    return torch.tensor(keep, dtype=torch.long).to(device)


def dedup_keep(masks: PastedMasks, classes: list[int], silhouette: list[float], iou_thresh: float,
               eligible: list[bool]) -> list[int]:
    """:func:`silhouette_dedup` on host per-instance values -> ascending kept indices. On CPU the
    pairs are found and measured on the host (:func:`_duplicates_host`); elsewhere the device is read
    once: the masks' areas and the pair intersections, in one transfer."""
    n = len(masks)
    if masks.device.type == "cpu":
        dup = _duplicates_host(masks, classes, iou_thresh, eligible)
    else:
        dup = _duplicates_device(masks, classes, iou_thresh, eligible)
    order = torch.argsort(torch.tensor(silhouette, dtype=torch.float64), descending=True, stable=True).tolist()
    removed = [False] * n
    for i in order:
        if not removed[i]:
            for j in dup[i]:
                removed[j] = True
    return [i for i in range(n) if not removed[i]]


def _region_pairs(regions: Sequence[Sequence[int]], classes: list[int], eligible: list[bool]
                  ) -> tuple[np.ndarray, ...]:
    """The candidate duplicate pairs i < j (same class, both eligible, intersecting regions) as index
    arrays ``ii, jj``, with the (n, n) intersection rectangles ``ix0, iy0, ix1, iy1`` of the regions."""
    n = len(regions)
    reg = np.asarray(regions, dtype=np.int64).reshape(-1, 4)
    cls = np.asarray(classes, dtype=np.int64)
    ok = np.asarray(eligible, dtype=bool)
    ix0 = np.maximum(reg[:, None, 0], reg[None, :, 0])
    iy0 = np.maximum(reg[:, None, 1], reg[None, :, 1])
    ix1 = np.minimum(reg[:, None, 2], reg[None, :, 2])
    iy1 = np.minimum(reg[:, None, 3], reg[None, :, 3])
    pair = (ix1 > ix0) & (iy1 > iy0) & (cls[:, None] == cls[None, :]) & ok[:, None] & ok[None, :]
    pair &= np.triu(np.ones((n, n), dtype=bool), 1)
    ii, jj = np.nonzero(pair)
    return ii, jj, ix0, iy0, ix1, iy1


def _duplicates_host(masks: PastedMasks, classes: list[int], iou_thresh: float,
                     eligible: list[bool]) -> list[list[int]]:
    """Per instance the instances it duplicates (same class, both eligible, mask IoU above
    ``iou_thresh``), on CPU. Pairs come from NumPy over the regions; a pair is measured only when
    its IoU can pass: the intersection is at most ``m = min(area_i, area_j, region overlap)`` and
    IoU grows with the intersection, so ``m / (area_i + area_j - m) <= iou_thresh`` (rounding is
    monotone) rules it out exactly. The rest are counted on the overlap of the two crops."""
    n = len(masks)
    dup: list[list[int]] = [[] for _ in range(n)]
    ii, jj, ix0, iy0, ix1, iy1 = _region_pairs(masks.regions, classes, eligible)
    if not len(ii):
        return dup
    area = np.asarray(masks.areas, dtype=np.int64)
    bound = np.minimum(np.minimum(area[ii], area[jj]), (ix1[ii, jj] - ix0[ii, jj]) * (iy1[ii, jj] - iy0[ii, jj]))
    union = area[ii] + area[jj] - bound
    can = union > 0
    can[can] = bound[can] / union[can] > iou_thresh
    areas = masks.areas
    for i, j in zip(ii[can].tolist(), jj[can].tolist()):
        x0, y0, x1, y1 = int(ix0[i, j]), int(iy0[i, j]), int(ix1[i, j]), int(iy1[i, j])
        ri, rj = masks.regions[i], masks.regions[j]
        a = masks.crop(i).numpy()[y0 - ri[1]:y1 - ri[1], x0 - ri[0]:x1 - ri[0]]
        b = masks.crop(j).numpy()[y0 - rj[1]:y1 - rj[1], x0 - rj[0]:x1 - rj[0]]
        inter = int(np.count_nonzero(a & b))
        union_ij = areas[i] + areas[j] - inter
        if union_ij > 0 and inter / union_ij > iou_thresh:
            dup[i].append(j)
            dup[j].append(i)
    return dup


def _duplicates_device(masks: PastedMasks, classes: list[int], iou_thresh: float,
                       eligible: list[bool]) -> list[list[int]]:
    """:func:`_duplicates_host` on the masks' device: every same-class pair of eligible instances
    whose regions intersect is measured there, and the areas and intersections are read in one
    transfer."""
    n = len(masks)
    ii, jj, ix0, iy0, ix1, iy1 = _region_pairs(masks.regions, classes, eligible)
    dup: list[list[int]] = [[] for _ in range(n)]
    if len(ii):
        boxes = np.stack([ix0[ii, jj], iy0[ii, jj], ix1[ii, jj], iy1[ii, jj]], 1).tolist()
        pairs = list(zip(ii.tolist(), jj.tolist()))
        inters = []
        for (i, j), (x0, y0, x1, y1) in zip(pairs, boxes):
            ri, rj = masks.regions[i], masks.regions[j]
            a = masks.crop(i)[y0 - ri[1]:y1 - ri[1], x0 - ri[0]:x1 - ri[0]]
            b = masks.crop(j)[y0 - rj[1]:y1 - rj[1], x0 - rj[0]:x1 - rj[0]]
            inters.append((a & b).sum())
        got = torch.cat([torch.stack(inters), masks.area_tensor()]).tolist()
        areas = got[len(pairs):]
        for (i, j), inter in zip(pairs, got[:len(pairs)]):
            union = areas[i] + areas[j] - inter
            if union > 0 and inter / union > iou_thresh:
                dup[i].append(j)
                dup[j].append(i)
    return dup
