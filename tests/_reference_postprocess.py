"""The post-processing as it was before issue 13 (commit cd0d2cd), kept verbatim as the slow
reference the fast implementation must reproduce exactly: same id maps, same segments, same
instances. Test-only; never imported by the package."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import level_entries, postprocess_cfg, select_candidates
from sepsnet.postprocess.scoring import mask_scores


# ---- results.py
@dataclass
class PanopticResult:
    """Panoptic output of one image, at the ORIGINAL image resolution.

    ``id_map``: int32 (h, w), 0 = void, k = ``segments_info[i]["id"]``.
    ``segments_info``: list of dicts ``id, category_id`` (contiguous: things 0..T-1,
    stuff 0..S-1), ``isthing``, ``score`` (mask score for things, 1.0 for stuff),
    ``area`` (pixels), ``bbox`` ([x, y, w, h] in pixels).
    The ``instance_*`` fields hold every instance kept after NMS and silhouette dedup
    (before fusion; used e.g. for instance AP); boxes are xyxy in original pixels,
    ``instance_masks`` bool (n, h, w) or None when not requested.
    ``timings``: seconds per post-processing stage (batch stages are shared).
    """

    id_map: torch.Tensor
    segments_info: list[dict[str, Any]]
    image_size: tuple[int, int]
    instance_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    instance_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    instance_classes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    instance_masks: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        return int(self.instance_scores.numel())

    def to(self, device: torch.device | str) -> PanopticResult:
        """Copy the tensors to ``device`` (e.g. ``"cpu"`` before writing)."""
        masks = None if self.instance_masks is None else self.instance_masks.to(device)
        return PanopticResult(
            self.id_map.to(device), self.segments_info, self.image_size,
            self.instance_boxes.to(device), self.instance_scores.to(device),
            self.instance_classes.to(device), masks, dict(self.timings),
        )


# ---- paste.py
_CUDA_CHUNK_BYTES = 1 << 30  # float32 scratch per chunk on CUDA


def _interp_weights(coord0: torch.Tensor, size: torch.Tensor, pix: torch.Tensor, r: int) -> torch.Tensor:
    """(n, P, r) bilinear weights of pixels ``pix`` (P,) for boxes starting at ``coord0`` with
    extent ``size`` (n,), zero padding outside the r mask cells."""
    u = (pix[None, :].to(coord0.dtype) + 0.5 - coord0[:, None]) / size.clamp(min=1e-6)[:, None] * r - 0.5  # (n, P)
    u0 = torch.floor(u)
    f = (u - u0)[..., None]
    u0 = u0.long()[..., None]
    cells = torch.arange(r, device=u.device)
    return (1.0 - f) * (cells == u0) + f * (cells == u0 + 1)


def paste_regions(boxes: torch.Tensor, out_hw: tuple[int, int], mask_size: int) -> torch.Tensor:
    """Integer [x0, y0, x1, y1) image regions (n, 4) outside of which a pasted mask is zero."""
    h, w = int(out_hw[0]), int(out_hw[1])
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    # u > -1  <=>  x + 0.5 > x0 - 0.5 * bw / R  (and symmetric at the far side)
    x0 = torch.floor(boxes[:, 0] - 0.5 * bw / mask_size - 0.5).clamp(0, w)
    y0 = torch.floor(boxes[:, 1] - 0.5 * bh / mask_size - 0.5).clamp(0, h)
    x1 = torch.ceil(boxes[:, 2] + 0.5 * bw / mask_size + 0.5).clamp(0, w)
    y1 = torch.ceil(boxes[:, 3] + 0.5 * bh / mask_size + 0.5).clamp(0, h)
    return torch.stack([x0, y0, x1, y1], 1).long()


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    chunk_size: int | None = None,
    return_regions: bool = False,
):
    """Paste ``mask_probs`` (n, R, R) at ``boxes`` (n, 4) xyxy (output pixels) into an
    ``out_hw`` image -> bool (n, h, w) (``mask >= threshold``); with ``return_regions`` also the
    (n, 4) regions of :func:`paste_regions`. Boxes partly or fully outside are clipped."""
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ConfigError(f"paste_masks: mask_probs must be (n,R,R), got {tuple(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4):
        raise ConfigError(f"paste_masks: boxes must be ({mask_probs.shape[0]},4), got {tuple(boxes.shape)}")
    n, r = mask_probs.shape[0], mask_probs.shape[1]
    h, w = int(out_hw[0]), int(out_hw[1])
    device = mask_probs.device
    out = torch.zeros((n, h, w), dtype=torch.bool, device=device)
    boxes = boxes.to(device=device, dtype=torch.float32)
    regions = paste_regions(boxes, (h, w), r)
    if n == 0 or h == 0 or w == 0:
        return (out, regions) if return_regions else out
    probs = mask_probs.float()
    if chunk_size is None:
        chunk_size = 1 if device.type == "cpu" else max(1, _CUDA_CHUNK_BYTES // (4 * h * w))
    reg_list = regions.tolist()
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        x0 = min(reg[0] for reg in reg_list[s:e])
        y0 = min(reg[1] for reg in reg_list[s:e])
        x1 = max(reg[2] for reg in reg_list[s:e])
        y1 = max(reg[3] for reg in reg_list[s:e])
        if x1 <= x0 or y1 <= y0:
            continue
        b = boxes[s:e]
        wy = _interp_weights(b[:, 1], b[:, 3] - b[:, 1], torch.arange(y0, y1, device=device), r)
        wx = _interp_weights(b[:, 0], b[:, 2] - b[:, 0], torch.arange(x0, x1, device=device), r)
        vals = wy @ probs[s:e] @ wx.transpose(1, 2)  # (c, y1-y0, x1-x0)
        out[s:e, y0:y1, x0:x1] = vals >= threshold
    return (out, regions) if return_regions else out


def scale_boxes(boxes: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes in network-input (resized) pixels -> original image pixels (undo the resize)."""
    sy = float(original_hw[0]) / float(resized_hw[0])
    sx = float(original_hw[1]) / float(resized_hw[1])
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


# ---- scoring.py (dedup)
def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight integer boxes [x0, y0, x1, y1) (exclusive end) of bool masks (n,h,w); empty -> 0s."""
    n = masks.shape[0]
    rows = masks.any(dim=2)  # (n, h)
    cols = masks.any(dim=1)  # (n, w)
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1) if h else torch.zeros(n, dtype=torch.long)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1) if h else torch.zeros(n, dtype=torch.long)
    x0 = torch.where(cols, ar_w, w).amin(1) if w else torch.zeros(n, dtype=torch.long)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1) if w else torch.zeros(n, dtype=torch.long)
    return torch.stack([x0, y0, x1, y1], 1)


def silhouette_dedup(
    masks: torch.Tensor,
    classes: torch.Tensor,
    silhouette_scores: torch.Tensor | None,
    iou_thresh: float,
    regions: torch.Tensor | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the instances kept by the rule in the module docstring.

    ``masks``: bool (n, h, w) pasted masks; ``classes``: (n,); ``silhouette_scores``: (n,) or
    None (keep all). ``regions``: optional int (n, 4) [x0, y0, x1, y1) boxes that contain each
    mask (e.g. from :func:`sepsnet.postprocess.paste.paste_regions`); computed when None.
    ``eligible``: optional bool (n,); only eligible instances are compared (default: all).
    """
    n = masks.shape[0]
    device = masks.device
    if silhouette_scores is None or n < 2:
        return torch.arange(n, device=device)
    if masks.dim() != 3 or classes.shape != (n,) or silhouette_scores.shape != (n,):
        raise ConfigError(f"silhouette_dedup: expected masks (n,h,w), classes (n,), scores (n,); got "
                          f"{tuple(masks.shape)}, {tuple(classes.shape)}, {tuple(silhouette_scores.shape)}")
    reg = (_mask_boxes(masks) if regions is None else regions.to(device=device, dtype=torch.long))
    areas = masks.flatten(1).sum(1) if regions is None else torch.stack(
        [masks[i, reg[i, 1]:reg[i, 3], reg[i, 0]:reg[i, 2]].sum() for i in range(n)])
    # candidate pairs: same class and intersecting regions (vectorised), upper triangle
    ix0 = torch.maximum(reg[:, None, 0], reg[None, :, 0])
    iy0 = torch.maximum(reg[:, None, 1], reg[None, :, 1])
    ix1 = torch.minimum(reg[:, None, 2], reg[None, :, 2])
    iy1 = torch.minimum(reg[:, None, 3], reg[None, :, 3])
    pair = (ix1 > ix0) & (iy1 > iy0) & (classes[:, None] == classes[None, :])
    pair &= torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    if eligible is not None:
        if eligible.shape != (n,):
            raise ConfigError(f"silhouette_dedup: eligible must be ({n},), got {tuple(eligible.shape)}")
        ok = eligible.to(device=device, dtype=torch.bool)
        pair &= ok[:, None] & ok[None, :]
    ii, jj = pair.nonzero(as_tuple=True)
    dup = torch.zeros(n, n, dtype=torch.bool)
    boxes_cpu = torch.stack([ix0[ii, jj], iy0[ii, jj], ix1[ii, jj], iy1[ii, jj]], 1).tolist()
    areas_cpu = areas.tolist()
    for (i, j), (x0, y0, x1, y1) in zip(zip(ii.tolist(), jj.tolist()), boxes_cpu):
        inter = int((masks[i, y0:y1, x0:x1] & masks[j, y0:y1, x0:x1]).sum())
        union = areas_cpu[i] + areas_cpu[j] - inter
        if union > 0 and inter / union > iou_thresh:
            dup[i, j] = dup[j, i] = True
    order = torch.argsort(silhouette_scores.detach().cpu(), descending=True, stable=True).tolist()
    removed = torch.zeros(n, dtype=torch.bool)
    for i in order:
        if not removed[i]:
            removed |= dup[i]
            removed[i] = False
    return (~removed).nonzero(as_tuple=True)[0].to(device)


# ---- fusion.py
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


# ---- pipeline.py
InstanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
_BAND_BYTES = 128 << 20  # float32 scratch per band of resized stuff logits (large maps)
_INTERP_BYTES = 768 << 20  # up to this, resize all stuff logits in one F.interpolate
STUFF_STRIDE = 4


def _sizes(image_sizes: Sequence[Any]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per image ``((resized_h, resized_w), (orig_h, orig_w))``; also accepts dicts with
    ``resized``/``original`` keys or a single (h, w) pair meaning no resize."""
    out = []
    for i, s in enumerate(image_sizes):
        if isinstance(s, Mapping):
            s = (s["resized"], s["original"])
        if len(s) == 2 and all(isinstance(v, (int,)) or (torch.is_tensor(v) and v.dim() == 0) for v in s):
            s = (s, s)
        try:
            (rh, rw), (oh, ow) = s
        except (TypeError, ValueError):
            raise ConfigError(f"image_sizes[{i}] must be ((resized_h, resized_w), (orig_h, orig_w)), got {s!r}") from None  # noqa: E501
        out.append(((int(rh), int(rw)), (int(oh), int(ow))))
    return out


def stuff_labels_at(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                    stride: int = STUFF_STRIDE) -> torch.Tensor:
    """Argmax of ``stuff_logits`` (C, hs, ws) (stride ``stride`` w.r.t. the padded input),
    cropped to the valid region and resampled bilinearly (half-pixel centres, border clamp)
    ``resized_hw`` to ``original_hw`` -> int64 (oh, ow). Done in row bands to bound memory."""
    (rh, rw), (oh, ow) = resized_hw, original_hw
    # crop to the valid cells (a partly valid last cell is kept); border clamp happens there
    logits = stuff_logits[:, : math.ceil(rh / stride), : math.ceil(rw / stride)].float()[None]
    c, hs, ws = logits.shape[1:]
    dev = stuff_logits.device
    if c * oh * ow * 4 <= _INTERP_BYTES:
        # fast path: one channels-last F.interpolate with the exact scale (same mapping as the
        # grid below); a replicated extra cell makes the output cover (oh, ow) whatever rounding
        x = F.pad(logits, (0, 1, 0, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
        up = F.interpolate(x, scale_factor=(stride * oh / rh, stride * ow / rw), mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)
        return up[0, :, :oh, :ow].argmax(0)
    # logit-map coordinate u of original pixel y: u = (y + 0.5) * (rh / oh) / stride - 0.5
    gx = (torch.arange(ow, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rw / (ow * stride * ws)) - 1.0
    gy_all = (torch.arange(oh, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rh / (oh * stride * hs)) - 1.0
    labels = torch.empty((oh, ow), dtype=torch.int64, device=dev)
    band = max(1, _BAND_BYTES // max(1, 4 * ow * (c + 2)))
    for y0 in range(0, oh, band):
        gy = gy_all[y0:y0 + band]
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        vals = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[y0:y0 + band] = vals[0].argmax(0)
    return labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_preselect(preselect: Mapping[str, Any] | None, pp: Any) -> None:
    """A pre-selecting dense engine is exact only for ``pre_nms_topk <= topk`` and
    ``score_thresh >= `` its threshold; ConfigError otherwise."""
    if preselect is None:
        return
    topk, thresh = int(preselect["topk"]), float(preselect["score_thresh"])
    if pp.pre_nms_topk > topk or pp.score_thresh < thresh:
        raise ConfigError(f"the dense engine keeps the top {topk} locations per level with score > {thresh}; "
                          f"post-processing asks pre_nms_topk={pp.pre_nms_topk}, score_thresh={pp.score_thresh}. "
                          "Re-export with a config holding these values (sepsnet-export --config) or lower them")


def panoptic_inference(
    dense: Mapping[str, torch.Tensor],
    run_instances: InstanceFn,
    image_sizes: Sequence[Any],
    cfg: Any,
    num_stuff_classes: int | None = None,
    return_masks: bool = True,
    preselect: Mapping[str, Any] | None = None,
) -> list[PanopticResult]:
    """Dense outputs (INTERFACES.md names) -> one :class:`PanopticResult` per image.

    ``run_instances(bases, p3, rois (n,5), attention (n,K*M*M))`` is the instance engine
    (``model.forward_instances`` or a backend); it is not called when no candidate survives.
    ``num_stuff_classes`` defaults to ``stuff_logits.shape[1] - 1``.
    ``preselect``: ``{"topk", "score_thresh", "padded"}`` of a dense engine that keeps only the top-k
    locations per level (the bundle manifest's ``preselect``); None for all locations.
    """
    pp = postprocess_cfg(cfg)
    check_preselect(preselect, pp)
    for key in ("boxes", "scores", "centerness", "attention", "bases", "p3", "stuff_logits"):
        if key not in dense:
            raise ConfigError(f"panoptic_inference: dense outputs lack {key!r} (have {sorted(dense)})")
    sizes = _sizes(image_sizes)
    n_img = dense["boxes"].shape[0]
    if len(sizes) != n_img:
        raise ConfigError(f"panoptic_inference: {len(sizes)} image sizes for a batch of {n_img}")
    device = dense["boxes"].device
    stuff_logits = dense["stuff_logits"]
    num_stuff = stuff_logits.shape[1] - 1 if num_stuff_classes is None else int(num_stuff_classes)
    t = {}

    _sync(device)
    t0 = time.perf_counter()
    cands = select_candidates(dense["boxes"], dense["scores"], dense["centerness"], dense["attention"],
                              level_entries(dense["p3"].shape[-2:], preselect), pp,
                              [s[0] for s in sizes])
    _sync(device)
    t["candidates"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts = [len(c) for c in cands]
    total = sum(counts)
    inst: dict[str, torch.Tensor | None] = {"mask_probs": None, "iou_score": None, "silhouette_score": None}
    if total:
        rois = torch.cat([torch.cat([c.batch_index[:, None].to(c.boxes.dtype), c.boxes], 1) for c in cands])
        attention = torch.cat([c.attention for c in cands])
        got = run_instances(dense["bases"], dense["p3"], rois, attention)
        if "mask_probs" not in got:
            raise ConfigError(f"panoptic_inference: instance outputs lack 'mask_probs' (have {sorted(got)})")
        inst = {k: (got[k] if k in got else None) for k in inst}
    _sync(device)
    t["instances"] = time.perf_counter() - t0

    results = []
    start = 0
    for b, c in enumerate(cands):
        tb = dict(t)
        (rh, rw), (oh, ow) = sizes[b]
        sl = slice(start, start + counts[b])
        start += counts[b]

        def part(name: str) -> torch.Tensor | None:
            v = inst[name]
            return None if v is None else v[sl].to(device).float()  # noqa: B023
        t0 = time.perf_counter()
        scores = mask_scores(c.scores.float(), part("iou_score"), pp.alpha)
        boxes = scale_boxes(c.boxes.float(), (rh, rw), (oh, ow))
        tb["scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        probs = part("mask_probs")
        if probs is None:
            r = 1
            probs = torch.zeros((0, r, r), device=device)
        masks, regions = paste_masks(probs, boxes, (oh, ow), pp.mask_thresh, return_regions=True)
        _sync(device)
        tb["paste"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        keep = silhouette_dedup(masks, c.classes, part("silhouette_score"), pp.dedup_iou, regions,
                                eligible=scores >= pp.instance_score_thresh)
        if keep.numel() != masks.shape[0]:
            masks, regions, scores, boxes = masks[keep], regions[keep], scores[keep], boxes[keep]
        classes = c.classes[keep]
        _sync(device)
        tb["dedup"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels = stuff_labels_at(stuff_logits[b], (rh, rw), (oh, ow))
        _sync(device)
        tb["stuff_resize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        id_map, segments = panoptic_fusion(masks, scores, classes, labels, pp, num_stuff, regions)
        _sync(device)
        tb["fusion"] = time.perf_counter() - t0
        tb["total"] = sum(tb.values())
        results.append(PanopticResult(
            id_map=id_map, segments_info=segments, image_size=(oh, ow), instance_boxes=boxes,
            instance_scores=scores, instance_classes=classes,
            instance_masks=masks if return_masks else None, timings=tb,
        ))
    return results
