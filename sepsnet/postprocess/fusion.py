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
"""
from __future__ import annotations

from typing import Any

import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import postprocess_cfg
from sepsnet.postprocess.scoring import _mask_boxes


def _num_stuff(cfg: Any, num_stuff_classes: int | None) -> int:
    if num_stuff_classes is not None:
        return int(num_stuff_classes)
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "num_stuff_classes"):
        return int(model.num_stuff_classes)
    raise ConfigError("panoptic_fusion: pass num_stuff_classes= or a full SEPSNetConfig "
                      "(model.num_stuff_classes) so the 'thing' label S of the stuff map is known")


def segment_stats(id_map: torch.Tensor, num_ids: int) -> tuple[list[int], list[list[int]]]:
    """Area and [x, y, w, h] bbox of ids 1..num_ids in one vectorised pass over ``id_map``."""
    h, w = id_map.shape
    ids = id_map.reshape(-1).long()
    area = torch.bincount(ids, minlength=num_ids + 1)
    ys = torch.arange(h, device=id_map.device).repeat_interleave(w)
    xs = torch.arange(w, device=id_map.device).repeat(h)
    big = max(h, w) + 1
    stats = []
    for coord, fill, how in ((xs, big, "amin"), (ys, big, "amin"), (xs, -1, "amax"), (ys, -1, "amax")):
        t = torch.full((num_ids + 1,), fill, dtype=torch.long, device=id_map.device)
        stats.append(t.scatter_reduce(0, ids, coord, reduce=how))
    x0, y0, x1, y1 = (s.tolist() for s in stats)
    areas = area.tolist()
    boxes = [[x0[k], y0[k], x1[k] - x0[k] + 1, y1[k] - y0[k] + 1] if areas[k] else [0, 0, 0, 0]
             for k in range(num_ids + 1)]
    return areas, boxes


def panoptic_fusion(
    masks: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    stuff_labels: torch.Tensor,
    cfg: Any,
    num_stuff_classes: int | None = None,
    regions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Fuse bool instance ``masks`` (n, h, w) with the stuff argmax ``stuff_labels`` (h, w).

    ``cfg``: full config or postprocess section (then give ``num_stuff_classes``).
    ``regions``: optional int (n, 4) [x0, y0, x1, y1) boxes containing each mask, used to
    restrict per-instance work (from :func:`sepsnet.postprocess.paste.paste_masks`).
    """
    pp = postprocess_cfg(cfg)
    num_stuff = _num_stuff(cfg, num_stuff_classes)
    if stuff_labels.dim() != 2:
        raise ConfigError(f"panoptic_fusion: stuff_labels must be (h,w), got {tuple(stuff_labels.shape)}")
    h, w = stuff_labels.shape
    n = masks.shape[0]
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w) or scores.shape != (n,) or classes.shape != (n,):
        raise ConfigError(f"panoptic_fusion: masks {tuple(masks.shape)}, scores {tuple(scores.shape)}, "
                          f"classes {tuple(classes.shape)} do not match stuff_labels ({h},{w})")
    device = stuff_labels.device
    id_map = torch.zeros((h, w), dtype=torch.int32, device=device)
    segments: list[dict[str, Any]] = []
    if n:
        masks = masks.to(device=device, dtype=torch.bool)
        reg = (_mask_boxes(masks) if regions is None else regions.to(device=device, dtype=torch.long)).tolist()
        score_list = scores.detach().float().cpu().tolist()
        class_list = classes.detach().cpu().tolist()
        order = sorted(range(n), key=lambda i: -score_list[i])
        for i in order:
            if score_list[i] < pp.instance_score_thresh:
                break
            x0, y0, x1, y1 = reg[i]
            m = masks[i, y0:y1, x0:x1]
            area = int(m.sum())
            if area == 0:
                continue
            crop = id_map[y0:y1, x0:x1]
            free = crop == 0
            kept = m & free
            kept_area = int(kept.sum())
            if (area - kept_area) / area > pp.overlap_thresh or kept_area == 0:
                continue
            seg_id = len(segments) + 1
            crop[kept] = seg_id
            segments.append({"id": seg_id, "category_id": int(class_list[i]), "isthing": True,
                             "score": float(score_list[i])})
    if num_stuff > 0:
        labels = stuff_labels.long()
        void = id_map == 0
        is_stuff = void & (labels >= 0) & (labels < num_stuff)
        lab = torch.where(is_stuff, labels, torch.full_like(labels, num_stuff))
        counts = torch.bincount(lab.reshape(-1), minlength=num_stuff + 1)[:num_stuff].tolist()
        lut = torch.zeros(num_stuff + 1, dtype=torch.int32)
        for c in range(num_stuff):
            if counts[c] > 0 and counts[c] >= pp.stuff_area_limit:
                seg_id = len(segments) + 1
                lut[c] = seg_id
                segments.append({"id": seg_id, "category_id": c, "isthing": False, "score": 1.0})
        if any(not s["isthing"] for s in segments):
            id_map = torch.where(is_stuff, lut.to(device)[lab], id_map)
    areas, boxes = segment_stats(id_map, len(segments))
    for seg in segments:
        seg["area"] = int(areas[seg["id"]])
        seg["bbox"] = boxes[seg["id"]]
    return id_map, segments
