"""Post-processing without host reads for dense outputs on a GPU (DESIGN "Inference split", device path).

Every stage works on fixed shapes, so nothing waits for the device until the frame's one read:

- ``candidates``: :func:`~sepsnet.postprocess.device_candidates.select_slot_candidates` (fixed top-k
  per level, exact greedy NMS as a fixed point, ``max_instances`` slots per image with a validity mask);
- ``instances``: one instance-engine call on every slot of the batch (``B * max_instances`` rois;
  empty slots get a zero box and are ignored after);
- ``scoring``: Eq. 4 on every slot;
- ``paste``: every slot's mask as a full-image plane (``Wy @ mask @ Wx^T``, the paste module's
  weights), cut to its paste region, in instance chunks of bounded memory;
- ``dedup``: pair intersections of all planes in one product (exact integer counts), the
  silhouette rule's greedy as a fixed point (:mod:`sepsnet.postprocess.fixed_point`);
- ``stuff``: the bilinear resample and argmax of the reference (no CPU shortcuts);
- ``fusion``: the Panoptic FPN things pass as a fixed point over all planes (an instance's kept
  pixels are those no accepted earlier instance covers), stuff by scatter-add counts, segment areas
  and bboxes by scatter reductions over the id map;
- then ONE read for the whole frame: each image's segment table, its kept instances and whether
  every fixed point settled. Host work after it builds ``segments_info`` and slices the kept
  instances (no further device read: the id map and instance tensors stay on the device).

When a fixed point has not settled in its fixed number of steps (a suppression or overlap chain
longer than that), :func:`device_panoptic_inference` returns None and the caller runs the host
path on the frame (exact, with its host reads). The output is the host path's: tested against
``tests/_reference_postprocess.py`` on CPU tensors (``device_path=True``), and the reads are
counted there with :class:`~sepsnet.postprocess.host_reads.HostReadCounter`. Memory: the planes are
``max_instances`` bytes per image pixel per image (about 200 MB at 1024x2048 with 100 slots), plus
the float32 chunk of the paste product and the fusion's byte pass (int16 past 254 slots).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import level_entries
from sepsnet.postprocess.device_candidates import NMS_ITERATIONS, SlotCandidates, select_slot_candidates
from sepsnet.postprocess.fixed_point import greedy_suppression, iterate, settled_prefix
from sepsnet.postprocess.paste import PastedMasks, _interp_weights, paste_regions
from sepsnet.postprocess.preselect import Preselect
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.scoring import mask_scores
from sepsnet.postprocess.stuff import resampled_labels
from sepsnet.postprocess.timing import StageTimer

#: fixed-point steps of the dedup (an n x n product each, cheap) and of the fusion's things pass (a
#: pass over all planes each); longer chains send the frame to the host path. The trained demo model
#: on the sample photos needs 4-6 fusion steps
DEDUP_ITERATIONS = 32
FUSION_ITERATIONS = 12
#: float32 scratch per chunk of the paste product
PASTE_CHUNK_BYTES = 256 << 20

_log = logging.getLogger("sepsnet")

InstanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


def use_device_path(dense: Mapping[str, torch.Tensor], device_path: bool | None) -> bool:
    """``device_path`` None: on for dense outputs on CUDA; True/False forces it (True on CPU tensors
    runs the same code, for tests)."""
    if device_path is None:
        return dense["boxes"].device.type == "cuda"
    return bool(device_path)


def _scale(boxes: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
    """:func:`~sepsnet.postprocess.paste.scale_boxes` with the scales as kernel arguments (no
    host->device copy of a scale tensor); the same float32 products."""
    sy = float(original_hw[0]) / float(resized_hw[0])
    sx = float(original_hw[1]) / float(resized_hw[1])
    out = torch.empty_like(boxes)
    out[:, 0::2] = boxes[:, 0::2] * sx
    out[:, 1::2] = boxes[:, 1::2] * sy
    return out


def paste_planes(probs: torch.Tensor, boxes: torch.Tensor, regions: torch.Tensor, valid: torch.Tensor,
                 out_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """Bool (n, h, w): each mask ``probs`` (n, R, R) pasted at ``boxes`` (n, 4) over the full image,
    ``>= threshold`` inside its paste region ``regions`` (n, 4), False elsewhere and for invalid ones."""
    n, r = probs.shape[0], probs.shape[-1]
    h, w = out_hw
    dev = probs.device
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    inside_y = (ys[None] >= regions[:, 1:2]) & (ys[None] < regions[:, 3:4]) & valid[:, None]
    inside_x = (xs[None] >= regions[:, 0:1]) & (xs[None] < regions[:, 2:3])
    out = torch.empty((n, h, w), dtype=torch.bool, device=dev)
    chunk = max(1, PASTE_CHUNK_BYTES // max(1, 4 * h * w))
    for s in range(0, n, chunk):
        b = boxes[s:s + chunk]
        wy = _interp_weights(b[:, 1], b[:, 3] - b[:, 1], ys, r)
        wx = _interp_weights(b[:, 0], b[:, 2] - b[:, 0], xs, r)
        vals = wy @ probs[s:s + chunk] @ wx.transpose(1, 2)
        torch.logical_and(vals >= threshold, inside_y[s:s + chunk, :, None] & inside_x[s:s + chunk, None, :],
                          out=out[s:s + chunk])
    return out


def dedup_alive(planes: torch.Tensor, areas: torch.Tensor, regions: torch.Tensor, classes: torch.Tensor,
                silhouette: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor, iou_thresh: float,
                iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The silhouette rule (:mod:`sepsnet.postprocess.scoring`) on all slots -> (kept bool (n,),
    settled bool 0-dim). Intersections are products of the 0/1 planes over pixel chunks (exact:
    float32 sums of ones up to 2**24 pixels, float64 beyond)."""
    n = planes.shape[0]
    flat = planes.flatten(1)
    dtype = torch.float32 if flat.shape[1] < (1 << 24) else torch.float64
    cols = max(1, PASTE_CHUNK_BYTES // (8 * max(1, n)))  # pixel columns per product (bounded scratch)
    inter = torch.zeros((n, n), dtype=dtype, device=planes.device)
    for s in range(0, flat.shape[1], cols):  # partial counts are exact integers, and so are their sums
        part = flat[:, s:s + cols].to(dtype)
        inter += part @ part.T
    inter = inter.long()
    ix0 = torch.maximum(regions[:, None, 0], regions[None, :, 0])
    iy0 = torch.maximum(regions[:, None, 1], regions[None, :, 1])
    ix1 = torch.minimum(regions[:, None, 2], regions[None, :, 2])
    iy1 = torch.minimum(regions[:, None, 3], regions[None, :, 3])
    pair = (ix1 > ix0) & (iy1 > iy0) & (classes[:, None] == classes[None, :]) & eligible[:, None] & eligible[None, :]
    union = areas[:, None] + areas[None, :] - inter
    dup = pair & (union > 0) & (inter.double() / union.double() > iou_thresh)
    dup &= ~torch.eye(n, dtype=torch.bool, device=dup.device)
    order = torch.where(valid, silhouette, float("-inf")).sort(descending=True, stable=True).indices
    later = torch.ones(n, n, dtype=torch.bool, device=dup.device).triu(1)
    suppress = dup[order][:, order] & later
    keep_sorted, settled = greedy_suppression(suppress, torch.ones_like(valid), iterations)
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return valid & keep, settled >= n


def fuse(planes: torch.Tensor, areas: torch.Tensor, scores: torch.Tensor, alive: torch.Tensor,
         labels: torch.Tensor, num_stuff: int, pp: Any, iterations: int) -> dict[str, torch.Tensor]:
    """Panoptic FPN fusion (:mod:`sepsnet.postprocess.fusion`) of all slots, no host read -> id map
    and per-segment tensors: ``order`` (slot per visit rank), ``accepted`` (per rank), ``stuff_taken``
    (per stuff class), ``stats`` (per id 0..n+S: area, x0, y0, x1, y1), ``settled`` (0-dim)."""
    n = planes.shape[0]
    h, w = labels.shape
    dev = planes.device
    visit = alive & (scores.double() >= pp.instance_score_thresh)  # the reference's Python comparison
    order = torch.where(visit, scores, float("-inf")).sort(descending=True, stable=True).indices
    vis, area = visit[order], areas[order]
    plane = planes[order]
    rank = torch.arange(n, device=dev, dtype=torch.uint8 if n < 255 else torch.int16 if n < (1 << 15) else torch.int32)
    none = torch.full((), n, dtype=rank.dtype, device=dev)

    def first_owner(acc: torch.Tensor) -> torch.Tensor:  # per pixel the first accepted rank covering it
        return torch.where(plane & acc[:, None, None], rank[:, None, None], none).amin(0) if n else \
            torch.full((h, w), n, dtype=rank.dtype, device=dev)

    plane_bytes = plane.view(torch.uint8)

    def step(acc: torch.Tensor) -> torch.Tensor:  # kept pixels: covered by no accepted earlier instance
        free = first_owner(acc)[None] >= rank[:, None, None]
        kept = (plane_bytes * free).flatten(1).sum(1, dtype=torch.int64)
        return vis & (kept > 0) & ((area - kept).double() / area.clamp(min=1).double() <= pp.overlap_thresh)

    accepted, prev = iterate(step, vis & (area > 0), iterations) if n else (vis, vis)
    settled = settled_prefix(accepted, prev) >= n
    owner = first_owner(accepted).long()
    seg_of_rank = torch.cat([(accepted.cumsum(0) * accepted).to(torch.int32),
                             torch.zeros(1, dtype=torch.int32, device=dev)])
    id_map = seg_of_rank[owner]
    num_things = accepted.sum()
    if num_stuff > 0:
        is_stuff = (id_map == 0) & (labels >= 0) & (labels < num_stuff)
        lab = torch.where(is_stuff, labels, num_stuff).reshape(-1)
        counts = torch.zeros(num_stuff + 1, dtype=torch.long, device=dev).index_add_(
            0, lab, torch.ones(1, dtype=torch.long, device=dev).expand(lab.numel()))[:num_stuff]
        taken = (counts > 0) & (counts.double() >= float(pp.stuff_area_limit))
        lut = torch.cat([torch.where(taken, num_things + taken.cumsum(0), 0).to(torch.int32),
                         torch.zeros(1, dtype=torch.int32, device=dev)])
        id_map = torch.where(is_stuff, lut[lab].view(h, w), id_map)
    else:
        taken = torch.zeros(0, dtype=torch.bool, device=dev)
    ids = id_map.reshape(-1).long()
    k = n + num_stuff + 1
    big = max(h, w) + 1
    ys = torch.arange(h, device=dev).repeat_interleave(w, output_size=h * w)
    xs = torch.arange(w, device=dev).repeat(h)
    stats = [torch.zeros(k, dtype=torch.long, device=dev).index_add_(
        0, ids, torch.ones(1, dtype=torch.long, device=dev).expand(ids.numel()))]
    for coord, fill, how in ((xs, big, "amin"), (ys, big, "amin"), (xs, -1, "amax"), (ys, -1, "amax")):
        stats.append(torch.full((k,), fill, dtype=torch.long, device=dev).scatter_reduce(0, ids, coord, reduce=how))
    return {"id_map": id_map, "order": order, "accepted": accepted, "stuff_taken": taken,
            "stats": torch.stack(stats, 1), "settled": settled}


def _image_on_device(sc: SlotCandidates, b: int, inst: Mapping[str, torch.Tensor | None], stuff_logits: torch.Tensor,
                     resized_hw: tuple[int, int], original_hw: tuple[int, int], pp: Any, num_stuff: int,
                     timer: StageTimer, iterations: int, dedup_iterations: int) -> dict[str, torch.Tensor]:
    """Scoring, paste, dedup, stuff and fusion of image ``b``: device tensors only."""
    valid = sc.valid[b]
    probs = inst["mask_probs"][b]
    iou = None if inst.get("iou_score") is None else inst["iou_score"][b]
    sil = None if inst.get("silhouette_score") is None else inst["silhouette_score"][b]
    with timer.stage("scoring"):
        scores = mask_scores(sc.scores[b].float(), iou, pp.alpha)
        boxes = _scale(sc.boxes[b].float(), resized_hw, original_hw)
        regions = paste_regions(boxes, original_hw, probs.shape[-1])
    with timer.stage("paste"):
        planes = paste_planes(probs, boxes, regions, valid, original_hw, pp.mask_thresh)
        areas = planes.flatten(1).sum(1)
    with timer.stage("dedup"):
        if sil is None:
            alive, dedup_settled = valid, torch.ones((), dtype=torch.bool, device=valid.device)
        else:
            alive, dedup_settled = dedup_alive(planes, areas, regions, sc.classes[b], sil, valid & (
                scores >= pp.instance_score_thresh), valid, pp.dedup_iou, dedup_iterations)
    with timer.stage("stuff"):
        labels = resampled_labels(stuff_logits, resized_hw, original_hw, row_tiles=False).long()
    with timer.stage("fusion"):
        fused = fuse(planes, areas, scores, alive, labels, num_stuff, pp, iterations)
    # the kept slots first, in slot order (the instance lists are its first ``alive.sum()``)
    compact = (~alive).to(torch.uint8).sort(stable=True).indices
    return {"planes": planes, "scores": scores, "boxes": boxes, "classes": sc.classes[b], "regions": regions,
            "alive": alive, "areas": areas, "compact": compact, **fused,
            "settled": sc.settled[b] & dedup_settled & fused["settled"]}


def _packed(img: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float64 row of everything the host needs from an image (exact: ints < 2**53, float32 scores)."""
    parts = [img["settled"].double()[None], img["alive"].sum().double()[None], img["compact"].double(),
             img["regions"].double().flatten(), img["areas"].double(), img["order"].double(),
             img["accepted"].double(), img["scores"].double(), img["classes"].double(),
             img["stuff_taken"].double(), img["stats"].double().flatten()]
    return torch.cat(parts)


def _unpack(row: list[float], n: int, num_stuff: int) -> dict[str, Any]:
    """Host lists from :func:`_packed`'s row."""
    out: dict[str, Any] = {}
    pos = 0

    def take(name: str, count: int, conv: Callable[[float], Any] = int) -> None:
        nonlocal pos
        out[name] = [conv(v) for v in row[pos:pos + count]]
        pos += count

    take("settled", 1, bool)
    take("num_alive", 1)
    take("compact", n)
    take("regions", 4 * n)
    take("areas", n)
    take("order", n)
    take("accepted", n, bool)
    take("scores", n, float)
    take("classes", n)
    take("stuff_taken", num_stuff, bool)
    take("stats", 5 * (n + num_stuff + 1))
    return out


def _segments(host: dict[str, Any], n: int, num_stuff: int) -> list[dict[str, Any]]:
    """``segments_info`` (things by visit, then stuff by class; ids in that order) from the host lists."""
    stats = host["stats"]
    segments: list[dict[str, Any]] = []

    def add(category: int, isthing: bool, score: float) -> None:
        sid = len(segments) + 1
        area, x0, y0, x1, y1 = stats[5 * sid:5 * sid + 5]
        segments.append({"id": sid, "category_id": category, "isthing": isthing, "score": score, "area": area,
                         "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1] if area else [0, 0, 0, 0]})

    for r in range(n):
        if host["accepted"][r]:
            slot = host["order"][r]
            add(host["classes"][slot], True, host["scores"][slot])
    for c in range(num_stuff):
        if host["stuff_taken"][c]:
            add(c, False, 1.0)
    return segments


def device_panoptic_inference(dense: Mapping[str, torch.Tensor], run_instances: InstanceFn,
                              sizes: Sequence[tuple[tuple[int, int], tuple[int, int]]], pp: Any, num_stuff: int,
                              return_masks: bool = True, preselect: Preselect | None = None,
                              timer: StageTimer | None = None, panoptic_only: bool = False,
                              iterations: int | None = None, nms_iterations: int | None = None,
                              dedup_iterations: int | None = None) -> list[PanopticResult] | None:
    """:func:`~sepsnet.postprocess.pipeline.panoptic_inference` on fixed shapes with one host read
    per frame (module docstring); None when a fixed point did not settle (run the host path then).
    Arguments as there, already checked (``sizes``: per image ((resized), (original))); ``iterations``:
    fixed-point steps of the fusion, ``nms_iterations``/``dedup_iterations`` those of NMS and dedup."""
    timer = timer or StageTimer()
    iterations = FUSION_ITERATIONS if iterations is None else iterations
    nms_iterations = NMS_ITERATIONS if nms_iterations is None else nms_iterations
    dedup_iterations = DEDUP_ITERATIONS if dedup_iterations is None else dedup_iterations
    batch = dense["boxes"].shape[0]
    dev = dense["boxes"].device
    m = int(pp.max_instances)
    if m <= 0 or batch == 0:
        return None  # nothing to gain; the host path does not call the instance engine at all
    with timer.stage("candidates"):
        sc = select_slot_candidates(dense["boxes"], dense["scores"], dense["centerness"], dense["attention"],
                                    level_entries(dense["p3"].shape[-2:], preselect), pp, [s[0] for s in sizes],
                                    nms_iterations)
        if panoptic_only:  # the rule of pipeline.panoptic_candidates, on the slots
            fcos = sc.scores.float()
            sc.valid &= torch.maximum(fcos, mask_scores(fcos, torch.ones_like(fcos), pp.alpha)) \
                >= pp.instance_score_thresh
    with timer.stage("instances"):
        index = torch.arange(batch, device=dev).repeat_interleave(m, output_size=batch * m)
        rois = torch.cat([index[:, None].to(sc.boxes.dtype), sc.boxes.reshape(-1, 4)], 1)
        got = run_instances(dense["bases"], dense["p3"], rois, sc.attention.reshape(batch * m, -1))
        if "mask_probs" not in got:
            raise ConfigError(f"panoptic_inference: instance outputs lack 'mask_probs' (have {sorted(got)})")
        inst = {k: (None if got.get(k) is None else got[k].to(dev).float().reshape(batch, m, *got[k].shape[1:]))
                for k in ("mask_probs", "iou_score", "silhouette_score")}
    shared = timer.snapshot()
    images = []
    for b in range(batch):
        image_timer = StageTimer(timer.enabled, timer.device)
        images.append((_image_on_device(sc, b, inst, dense["stuff_logits"][b], sizes[b][0], sizes[b][1], pp,
                                        num_stuff, image_timer, iterations, dedup_iterations), image_timer))
    rows = torch.stack([_packed(img) for img, _ in images]).tolist()  # the frame's one host read
    hosts = [_unpack(row, m, num_stuff) for row in rows]
    if not all(h["settled"][0] for h in hosts):
        _log.debug("device post-processing: a fixed point did not settle in %d/%d/%d steps (NMS/dedup/fusion); "
                   "the frame runs on the host path", nms_iterations, dedup_iterations, iterations)
        return None
    results = []
    for (img, image_timer), host, ((_, _), (oh, ow)) in zip(images, hosts, sizes):
        kept = host["compact"][:host["num_alive"][0]]
        idx = img["compact"][:len(kept)]
        masks = None
        if return_masks:
            regions = [tuple(host["regions"][4 * i:4 * i + 4]) for i in kept]
            masks = PastedMasks(regions=regions, image_size=(oh, ow), threshold=pp.mask_thresh,
                                crops=[img["planes"][i, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in zip(kept, regions)],
                                device=dev, _areas=[host["areas"][i] for i in kept])
        res = PanopticResult(id_map=img["id_map"], segments_info=_segments(host, m, num_stuff), image_size=(oh, ow),
                             instance_boxes=img["boxes"][idx], instance_scores=img["scores"][idx],
                             instance_classes=img["classes"][idx], masks=masks)
        if timer.enabled:
            res.timings = {**shared, **image_timer.snapshot()}
            res.timings["total"] = sum(res.timings.values())
        results.append(res)
    return results
