"""The panoptic inference pipeline shared by PyTorch evaluation and every engine backend.

DESIGN "Inference split": dense outputs -> candidates (step 2) -> instance engine (step 3,
a callable) -> Eq. 4 mask scores, silhouette dedup (III-G), mask pasting, panoptic fusion
(step 4). Pure torch: runs wherever the dense outputs live (CPU or CUDA). Results are at
the ORIGINAL image resolution: boxes are scaled by original/resized, masks are pasted
directly at the original size, and the stuff logits (1/4 of the padded input) are sampled
bilinearly at original pixel centres through the valid (resized, unpadded) region before
the argmax.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import level_entries, postprocess_cfg, select_candidates
from sepsnet.postprocess.fusion import panoptic_fusion
from sepsnet.postprocess.paste import paste_masks, scale_boxes
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.scoring import mask_scores, silhouette_dedup

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
            raise ConfigError(f"image_sizes[{i}] must be ((resized_h, resized_w), (orig_h, orig_w)), got {s!r}") from None
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
            return None if v is None else v[sl].to(device).float()

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
