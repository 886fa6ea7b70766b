"""Panoptic fusion, Panoptic-FPN style (DESIGN "Inference split", step 4).

Same semantics as detectron2's ``combine_semantic_and_instance_outputs``:
1. instances with score >= ``instance_score_thresh`` are visited by descending score; an
   instance is skipped when the fraction of its mask already taken by earlier segments is
   above ``overlap_thresh`` (intersection / mask area); otherwise it gets its pixels not yet
   taken;
2. every stuff class of the stuff head's argmax (labels ``0..S-1``; label ``S`` = "thing" and
   anything outside ``[0, S)`` is ignored) gets the still-void pixels of that class when they
   are at least ``stuff_area_limit`` pixels.
Output: int32 id map (0 = void, ids 1..n in the order the segments were created) and
``segments_info`` (``id``, contiguous ``category_id``, ``isthing``, ``score`` (1.0 for stuff),
``area``, ``bbox`` [x, y, w, h]).

Fast and memory-bounded form of the same rule: each instance is fused on its box crop against
the running occupancy (the id map itself), its area and bbox taken from the pixels it kept
(stuff never overwrites a thing); stuff areas and bboxes come from per-row and per-column
counts of the void pixels of each class, in row bands, so no full-image plane per class or per
instance is ever made.
"""
from __future__ import annotations

from typing import Any

import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import postprocess_cfg
from sepsnet.postprocess.paste import PastedMasks


def _num_stuff(cfg: Any, num_stuff_classes: int | None) -> int:
    if num_stuff_classes is not None:
        return int(num_stuff_classes)
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "num_stuff_classes"):
        return int(model.num_stuff_classes)
    raise ConfigError("panoptic_fusion: pass num_stuff_classes= or a full SEPSNetConfig "
                      "(model.num_stuff_classes) so the 'thing' label S of the stuff map is known")


#: label pixels per band of the stuff pass (bounds the int32 scratch at any image size)
BAND_PIXELS = 1 << 22


def _first_last(flags: torch.Tensor) -> tuple[int, int]:
    """First and last index of True in a 1-d bool tensor (it has at least one)."""
    idx = flags.nonzero()
    return int(idx[0]), int(idx[-1])


def _fuse_things(masks: PastedMasks, scores: list[float], classes: list[int], id_map: torch.Tensor,
                 pp: Any) -> list[dict[str, Any]]:
    """Step 1 of the module docstring, on box crops against the running occupancy ``id_map``."""
    segments: list[dict[str, Any]] = []
    order = sorted(range(len(masks)), key=lambda i: -scores[i])
    areas = None
    for i in order:
        if scores[i] < pp.instance_score_thresh:
            break
        x0, y0, x1, y1 = masks.regions[i]
        if x1 <= x0 or y1 <= y0:
            continue
        if areas is None:
            areas = masks.areas
        area = areas[i]
        if area == 0:
            continue
        occupied = id_map[y0:y1, x0:x1]
        kept = masks.crop(i) & (occupied == 0)
        kept_area = int(kept.sum())
        if (area - kept_area) / area > pp.overlap_thresh or kept_area == 0:
            continue
        seg_id = len(segments) + 1
        occupied.masked_fill_(kept, seg_id)
        ky0, ky1 = _first_last(kept.any(dim=1))
        kx0, kx1 = _first_last(kept.any(dim=0))
        segments.append({"id": seg_id, "category_id": int(classes[i]), "isthing": True, "score": float(scores[i]),
                         "area": kept_area, "bbox": [x0 + kx0, y0 + ky0, kx1 - kx0 + 1, ky1 - ky0 + 1]})
    return segments


def _fuse_stuff(stuff_labels: torch.Tensor, id_map: torch.Tensor, num_stuff: int, first_id: int,
                pp: Any) -> list[dict[str, Any]]:
    """Step 2 of the module docstring: stuff classes take the still-void pixels, in row bands.
    Pass 1 counts every class's void pixels per row and per column (area and bbox); pass 2 adds
    the segment ids of the classes that reach ``stuff_area_limit`` (0 for the others) to the
    void pixels."""
    h, w = id_map.shape
    device = id_map.device
    k = num_stuff + 1
    band = max(1, BAND_PIXELS // max(1, w))
    row_counts = torch.zeros((h, k), dtype=torch.long, device=device)
    col_counts = torch.zeros((w, k), dtype=torch.long, device=device)
    col_key = torch.arange(w, device=device, dtype=torch.int32) * k
    row_key = torch.arange(h, device=device, dtype=torch.int32)[:, None] * k
    masked = torch.empty((h, w), dtype=torch.uint8 if k <= 256 else torch.int32, device=device)
    signed = stuff_labels.dtype.is_signed
    for s in range(0, h, band):
        e = min(h, s + band)
        lab = stuff_labels[s:e]
        is_stuff = (id_map[s:e] == 0) & (lab < num_stuff)
        if signed:
            is_stuff &= lab >= 0
        m = lab.to(masked.dtype).masked_fill(~is_stuff, num_stuff)  # (torch.where with a scalar goes via int64)
        masked[s:e] = m
        m32 = m.to(torch.int32)
        row_counts[s:e] = torch.bincount((m32 + row_key[: e - s]).view(-1), minlength=(e - s) * k).view(e - s, k)
        col_counts += torch.bincount((m32 + col_key).view(-1), minlength=w * k).view(w, k)
    count_list = row_counts[:, :num_stuff].sum(0).tolist()
    lut = torch.zeros(k, dtype=torch.int32)
    segments: list[dict[str, Any]] = []
    for c in range(num_stuff):
        if count_list[c] > 0 and count_list[c] >= pp.stuff_area_limit:
            seg_id = first_id + len(segments)
            lut[c] = seg_id
            y0, y1 = _first_last(row_counts[:, c] > 0)
            x0, x1 = _first_last(col_counts[:, c] > 0)
            segments.append({"id": seg_id, "category_id": c, "isthing": False, "score": 1.0,
                             "area": int(count_list[c]), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    if segments:
        lut = lut.to(device)
        for s in range(0, h, band):  # void pixels hold 0, the others get lut[num_stuff] = 0
            e = min(h, s + band)
            id_map[s:e] += lut.index_select(0, masked[s:e].reshape(-1).to(torch.int32)).view(e - s, w)
    return segments


def panoptic_fusion(
    masks: torch.Tensor | PastedMasks,
    scores: torch.Tensor,
    classes: torch.Tensor,
    stuff_labels: torch.Tensor,
    cfg: Any,
    num_stuff_classes: int | None = None,
    regions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Fuse instance masks with the stuff argmax ``stuff_labels`` (h, w) (any integer dtype).

    ``masks``: :class:`PastedMasks` (crops per box, what the pipeline passes) or bool (n, h, w)
    planes, then ``regions`` optionally gives int (n, 4) [x0, y0, x1, y1) boxes containing each
    mask (tight boxes when None). ``cfg``: full config or postprocess section (then give
    ``num_stuff_classes``). Work is per box crop plus two passes over the stuff map.
    """
    pp = postprocess_cfg(cfg)
    num_stuff = _num_stuff(cfg, num_stuff_classes)
    if stuff_labels.dim() != 2:
        raise ConfigError(f"panoptic_fusion: stuff_labels must be (h,w), got {tuple(stuff_labels.shape)}")
    h, w = stuff_labels.shape
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w):
            raise ConfigError(f"panoptic_fusion: masks {tuple(masks.shape)} do not match stuff_labels ({h},{w})")
        masks = PastedMasks.from_dense(masks.to(device=stuff_labels.device), regions)
    n = len(masks)
    if tuple(masks.image_size) != (h, w) or scores.shape != (n,) or classes.shape != (n,):
        raise ConfigError(f"panoptic_fusion: masks of {n} instances at {tuple(masks.image_size)}, scores "
                          f"{tuple(scores.shape)}, classes {tuple(classes.shape)} do not match stuff_labels ({h},{w})")
    id_map = torch.zeros((h, w), dtype=torch.int32, device=stuff_labels.device)
    segments: list[dict[str, Any]] = []
    if n:
        segments = _fuse_things(masks, scores.detach().float().cpu().tolist(), classes.detach().cpu().tolist(),
                                id_map, pp)
    if num_stuff > 0:
        segments += _fuse_stuff(stuff_labels, id_map, num_stuff, len(segments) + 1, pp)
    return id_map, segments
