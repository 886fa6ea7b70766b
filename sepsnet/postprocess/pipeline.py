"""The panoptic inference pipeline shared by PyTorch evaluation and every engine backend.

DESIGN "Inference split" as a short orchestration of named stages (the shape of detectron2's
panoptic_fpn inference): ``candidates`` (step 2, on the dense outputs as the engine gives them,
pre-selected or not) -> ``instances`` (step 3: the instance engine, one call for the batch) ->
per image :func:`postprocess_image`: ``scoring`` (Eq. 4), ``paste`` (masks per box crop),
``dedup`` (silhouette, III-G), ``stuff`` (stuff labels at the original size), ``fusion``
(step 4). Pure torch: runs wherever the dense outputs live (CPU or CUDA), with no explicit
device synchronisation unless stage timing is asked for (:class:`StageTimer`), and a fixed number
of host reads per image, none per instance (DESIGN "Inference split": one read of the per-instance
values after scoring, one for dedup, one at the end of fusion; candidate selection's ``nonzero``
and NMS read too). That is the host path; dense outputs on CUDA take the fixed-shape device path
instead (:mod:`sepsnet.postprocess.device_path`: one host read per frame, the instance engine called
on ``batch x max_instances`` padded rois). Results are at
the ORIGINAL image resolution: boxes are scaled by original/resized, masks are pasted directly
at the original size, and the stuff logits are sampled at original pixel centres
(:mod:`sepsnet.postprocess.stuff`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import Candidates, level_entries, postprocess_cfg, select_candidates
from sepsnet.postprocess.device_path import device_panoptic_inference, use_device_path
from sepsnet.postprocess.fusion import panoptic_fusion
from sepsnet.postprocess.paste import paste_mask_crops, paste_regions, scale_boxes
from sepsnet.postprocess.preselect import Preselect, check_preselect
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.scoring import dedup_keep, mask_scores
from sepsnet.postprocess.stuff import STUFF_STRIDE, stuff_label_map, stuff_labels_at
from sepsnet.postprocess.timing import StageTimer

__all__ = ["STUFF_STRIDE", "InstanceFn", "InstanceOutputs", "check_preselect", "panoptic_inference",
           "postprocess_image", "run_instance_engine", "stuff_labels_at"]

InstanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
DENSE_KEYS = ("boxes", "scores", "centerness", "attention", "bases", "p3", "stuff_logits")


@dataclass
class InstanceOutputs:
    """The instance engine's outputs for one image's candidates (None: not produced)."""

    mask_probs: torch.Tensor  # float32 (n, R, R)
    iou_score: torch.Tensor | None = None  # (n,)
    silhouette_score: torch.Tensor | None = None  # (n,)


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
            raise ConfigError(f"image_sizes[{i}] must be ((resized_h, resized_w), (orig_h, orig_w)), "
                              f"got {s!r}") from None
        out.append(((int(rh), int(rw)), (int(oh), int(ow))))
    return out


def panoptic_candidates(cands: Candidates, pp: Any) -> Candidates:
    """The candidates whose Eq. 4 mask score can reach ``pp.instance_score_thresh`` whatever the
    confidence head says: the score with a predicted IoU of 1 (its sigmoid's largest value), computed
    by :func:`mask_scores` itself (rounding is monotone, so no IoU gives more), or the FCOS score
    alone when there is no confidence head. The others are never eligible for dedup or fusion."""
    fcos = cands.scores.float()
    best = torch.maximum(fcos, mask_scores(fcos, torch.ones_like(fcos), pp.alpha))
    keep = best >= pp.instance_score_thresh
    return Candidates(boxes=cands.boxes[keep], scores=cands.scores[keep], classes=cands.classes[keep],
                      attention=cands.attention[keep], batch_index=cands.batch_index[keep])


def run_instance_engine(run_instances: InstanceFn, dense: Mapping[str, torch.Tensor],
                        cands: list[Candidates]) -> list[InstanceOutputs | None]:
    """One instance-engine call for every candidate of the batch (rois ``[batch_index, box]``),
    split back per image; None for an image without candidates (the engine is not called at all
    when no image has one)."""
    counts = [len(c) for c in cands]
    if not sum(counts):
        return [None] * len(cands)
    rois = torch.cat([torch.cat([c.batch_index[:, None].to(c.boxes.dtype), c.boxes], 1) for c in cands])
    attention = torch.cat([c.attention for c in cands])
    got = run_instances(dense["bases"], dense["p3"], rois, attention)
    if "mask_probs" not in got:
        raise ConfigError(f"panoptic_inference: instance outputs lack 'mask_probs' (have {sorted(got)})")
    device = dense["boxes"].device
    parts: dict[str, list[torch.Tensor] | None] = {}
    for name in ("mask_probs", "iou_score", "silhouette_score"):
        parts[name] = None if got.get(name) is None else list(got[name].to(device).float().split(counts))
    out: list[InstanceOutputs | None] = []
    for b, n in enumerate(counts):
        out.append(None if n == 0 else InstanceOutputs(
            **{k: (None if v is None else v[b]) for k, v in parts.items()}))
    return out


def postprocess_image(cands: Candidates, inst: InstanceOutputs | None, stuff_logits: torch.Tensor,
                      resized_hw: tuple[int, int], original_hw: tuple[int, int], pp: Any, num_stuff: int,
                      return_masks: bool = True, timer: StageTimer | None = None) -> PanopticResult:
    """Step 4 for one image: Eq. 4 scores, masks pasted per box at the original size, silhouette
    dedup, stuff labels, panoptic fusion -> :class:`PanopticResult`."""
    timer = timer or StageTimer()
    device = stuff_logits.device
    probs = inst.mask_probs if inst is not None else torch.zeros((0, 1, 1), device=device)
    sil = None if inst is None else inst.silhouette_score
    with timer.stage("scoring"):
        scores = mask_scores(cands.scores.float(), None if inst is None else inst.iou_score, pp.alpha)
        boxes = scale_boxes(cands.boxes.float(), resized_hw, original_hw)
        # the one read of per-instance values before the end of the image: paste regions, scores,
        # classes, silhouette scores (float64 holds them exactly), as host lists
        regions = paste_regions(boxes.to(probs.device), original_hw, probs.shape[-1])
        eligible = scores >= pp.instance_score_thresh  # float32 comparison, as the tensor rule has it
        cols = [regions.double(), scores.detach().double()[:, None], cands.classes.double()[:, None],
                eligible.double()[:, None]]
        if sil is not None:
            cols.append(sil.detach().double()[:, None].to(regions.device))
        meta = torch.cat([c.to(regions.device) for c in cols], 1).cpu()
        host_regions = meta[:, :4].long().tolist()
        host_scores = meta[:, 4].float().tolist()
        host_classes = meta[:, 5].long().tolist()
    with timer.stage("paste"):
        masks = paste_mask_crops(probs, boxes, original_hw, pp.mask_thresh, regions=host_regions)
    with timer.stage("dedup"):
        classes = cands.classes
        if sil is not None and len(masks) > 1:
            keep = dedup_keep(masks, host_classes, meta[:, 7].tolist(), pp.dedup_iou, meta[:, 6].bool().tolist())
            if len(keep) != len(masks):
                masks = masks.select(keep)
                idx = torch.tensor(keep, dtype=torch.long).to(scores.device)
                scores, boxes, classes = scores[idx], boxes[idx], classes[idx]
                host_scores = [host_scores[k] for k in keep]
                host_classes = [host_classes[k] for k in keep]
    with timer.stage("stuff"):
        labels = stuff_label_map(stuff_logits, resized_hw, original_hw)
    with timer.stage("fusion"):
        id_map, segments = panoptic_fusion(masks, scores, classes, labels, pp, num_stuff,
                                           host_scores=host_scores, host_classes=host_classes)
    return PanopticResult(id_map=id_map, segments_info=segments, image_size=original_hw, instance_boxes=boxes,
                          instance_scores=scores, instance_classes=classes,
                          masks=masks if return_masks else None)


def panoptic_inference(
    dense: Mapping[str, torch.Tensor],
    run_instances: InstanceFn,
    image_sizes: Sequence[Any],
    cfg: Any,
    num_stuff_classes: int | None = None,
    return_masks: bool = True,
    preselect: Preselect | Mapping[str, Any] | None = None,
    timer: StageTimer | None = None,
    panoptic_only: bool = False,
    device_path: bool | None = None,
) -> list[PanopticResult]:
    """Dense outputs (INTERFACES.md names) -> one :class:`PanopticResult` per image.

    ``run_instances(bases, p3, rois (n,5), attention (n,K*M*M))`` is the instance engine
    (``model.forward_instances`` or a backend); it is not called when no candidate survives.
    ``num_stuff_classes`` defaults to ``stuff_logits.shape[1] - 1``. ``preselect``: the
    :class:`Preselect` of a dense engine that keeps only the top-k locations per level (None
    for all locations). ``timer``: an enabled :class:`StageTimer` fills each result's
    ``timings`` (seconds per stage; the batch stages are shared); without one nothing is timed.
    ``panoptic_only``: the instance engine runs only on candidates that can reach
    ``instance_score_thresh`` (:func:`panoptic_candidates`); the panoptic output is the same, the
    result's instance lists hold only those candidates (mask AP needs them all: off by default).
    ``device_path``: the fixed-shape path with one host read per frame
    (:mod:`sepsnet.postprocess.device_path`); None (default) takes it for dense outputs on CUDA,
    True forces it (also on CPU tensors: tests), False never. It finishes a frame on this host path
    when one of its fixed points has not settled.
    """
    pp = postprocess_cfg(cfg)
    preselect = Preselect.coerce(preselect)
    check_preselect(preselect, pp)
    for key in DENSE_KEYS:
        if key not in dense:
            raise ConfigError(f"panoptic_inference: dense outputs lack {key!r} (have {sorted(dense)})")
    sizes = _sizes(image_sizes)
    if len(sizes) != dense["boxes"].shape[0]:
        raise ConfigError(f"panoptic_inference: {len(sizes)} image sizes for a batch of {dense['boxes'].shape[0]}")
    stuff_logits = dense["stuff_logits"]
    num_stuff = stuff_logits.shape[1] - 1 if num_stuff_classes is None else int(num_stuff_classes)
    timer = timer or StageTimer()
    if use_device_path(dense, device_path):
        results = device_panoptic_inference(dense, run_instances, sizes, pp, num_stuff, return_masks, preselect,
                                            timer, panoptic_only)
        if results is not None:
            return results
        timer.seconds.clear()  # the frame again on the host path (rare: see device_path)
    with timer.stage("candidates"):
        cands = select_candidates(dense["boxes"], dense["scores"], dense["centerness"], dense["attention"],
                                  level_entries(dense["p3"].shape[-2:], preselect), pp, [s[0] for s in sizes])
        if panoptic_only:
            cands = [panoptic_candidates(c, pp) for c in cands]
    with timer.stage("instances"):
        inst = run_instance_engine(run_instances, dense, cands)
    shared = timer.snapshot()
    results = []
    for b, (c, out) in enumerate(zip(cands, inst)):
        image_timer = StageTimer(timer.enabled, timer.device)
        res = postprocess_image(c, out, stuff_logits[b], sizes[b][0], sizes[b][1], pp, num_stuff, return_masks,
                                image_timer)
        if timer.enabled:
            res.timings = {**shared, **image_timer.snapshot()}
            res.timings["total"] = sum(res.timings.values())
        results.append(res)
    return results
