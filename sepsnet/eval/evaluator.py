"""Run the model + shared post-processing over a dataset; report PQ and mask AP and write
predictions in COCO panoptic format (the same pipeline the engine runtime uses)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.transforms import collate
from sepsnet.errors import DataError
from sepsnet.eval.instance_ap import InstanceAPAccumulator
from sepsnet.eval.pq import PQAccumulator
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.writers import CityscapesPanopticWriter, CocoPanopticWriter, _remap, write_json

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: CocoPanopticDataset, cfg: SEPSNetConfig,
                   out_dir: str | Path | None = None, max_images: int | None = None,
                   batch_size: int = 1, with_ap: bool = True,
                   boundary_ratio: float | None = None, skip_bad: bool | None = None) -> dict[str, Any]:
    """PQ (COCO panoptic API semantics) over ``dataset`` (its GT PNGs at original size).

    Returns ``{"PQ", "SQ", "RQ", "PQ_th", "PQ_st", ..., "mask_AP", "images", "skipped",
    "seconds_per_image"}``; writes ``out_dir/panoptic_predictions{.json,/}`` and
    ``out_dir/metrics.json`` (with ``skipped_files``) when given. ``boundary_ratio`` (e.g. 0.02)
    adds Boundary PQ (``PQ_boundary``, ``_th``, ``_st``), the contour-sensitive variant of
    ``sepsnet.eval.boundary``. Every image is evaluated against its own ground truth, never a
    substitute: a bad image (unreadable, wrong bit depth, size differing from its PNG) raises
    DataError naming the file, or with ``skip_bad`` (default ``dataset.skip_bad``) is left out
    with a warning naming the file and counted in ``skipped``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    meta = dataset.meta
    categories = meta.categories()
    pq = PQAccumulator(categories)
    bpq = PQAccumulator(categories, dilation_ratio=boundary_ratio) if boundary_ratio else None
    ap = InstanceAPAccumulator(categories) if with_ap else None
    writers = []
    if out_dir:
        writers.append(CocoPanopticWriter(out_dir, meta.to_dict()))
        if cfg.data.format == "cityscapes":  # also the Cityscapes panoptic format
            writers.append(CityscapesPanopticWriter(out_dir, meta.to_dict()))
    thing_ids = [t["id"] for t in meta.things]
    skip_bad = dataset.skip_bad if skip_bad is None else skip_bad
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    skipped: list[str] = []
    start = time.perf_counter()
    try:
        for first in range(0, n, batch_size):
            items = []
            for i in range(first, min(n, first + batch_size)):
                try:
                    items.append(dataset.load_item(i))
                except DataError as exc:
                    if not skip_bad:
                        raise
                    rec = dataset.records[i]
                    skipped.append(str(rec["image_path"]))
                    log.warning("evaluation: skipping bad image %s (%s)", rec["image_path"], exc)
            if not items:
                continue
            images, _, infos = collate(items, cfg.data.size_divisibility)
            dense = model.forward_dense(images.to(device))
            sizes = [(info["resized_size"], info["original_size"]) for info in infos]
            results = panoptic_inference(dense, model.forward_instances, sizes, cfg)
            for res, info in zip(results, infos):
                res = res.to("cpu")
                index = info["index"]  # the sample actually loaded: its own ground truth
                gt_ids, gt_segments = dataset.load_gt(index)
                pred_ids, pred_segs = _remap(res, meta.to_dict(), False)
                pq.add(gt_ids, gt_segments, pred_ids, pred_segs, image_id=info["image_id"])
                if bpq is not None:
                    bpq.add(gt_ids, gt_segments, pred_ids, pred_segs, image_id=info["image_id"])
                for writer in writers:
                    writer.add(res, info["image_id"], info["file_name"])
                if ap is not None:
                    _add_ap(ap, index, gt_ids, gt_segments, res, thing_ids)
    finally:
        if was_training:
            model.train()
    if n and len(skipped) == n:
        raise DataError(f"no readable image to evaluate: all {n} skipped (first: {skipped[0]})")
    evaluated = n - len(skipped)
    summary = pq.summary()
    metrics: dict[str, Any] = {
        "PQ": summary["All"]["pq"], "SQ": summary["All"]["sq"], "RQ": summary["All"]["rq"],
        "PQ_th": summary["Things"]["pq"], "SQ_th": summary["Things"]["sq"], "RQ_th": summary["Things"]["rq"],
        "PQ_st": summary["Stuff"]["pq"], "SQ_st": summary["Stuff"]["sq"], "RQ_st": summary["Stuff"]["rq"],
        "images": evaluated, "skipped": len(skipped),
        "seconds_per_image": (time.perf_counter() - start) / max(evaluated, 1),
    }
    if bpq is not None:
        bsum = bpq.summary()
        metrics.update({"PQ_boundary": bsum["All"]["pq"], "PQ_boundary_th": bsum["Things"]["pq"],
                        "PQ_boundary_st": bsum["Stuff"]["pq"]})
    if ap is not None:
        ap_summary = ap.summary()
        metrics["mask_AP"] = ap_summary.get("segm", {}).get("AP", float("nan"))
        metrics["box_AP"] = ap_summary.get("bbox", {}).get("AP", float("nan"))
    for writer in writers:
        writer.close()
    if out_dir:
        write_json(Path(out_dir) / "metrics.json",
                   {**metrics, "skipped_files": skipped, "per_class": summary.get("per_class")})
    return metrics


def _add_ap(ap: InstanceAPAccumulator, image_id: int, gt_ids: np.ndarray, segments: list[dict[str, Any]],
            res: Any, thing_ids: list[int]) -> None:
    gt = [s for s in segments if s["category_id"] in set(thing_ids)]
    gt_masks = np.stack([gt_ids == s["id"] for s in gt]) if gt else np.zeros((0, *gt_ids.shape), bool)
    masks = res.instance_masks
    pred_masks = masks.numpy().astype(bool) if masks is not None and len(masks) else np.zeros((0, *gt_ids.shape), bool)
    classes = [thing_ids[int(c)] for c in res.instance_classes.tolist()]
    ap.add(image_id, gt_masks, [s["category_id"] for s in gt], pred_masks, res.instance_scores.tolist(), classes,
           gt_iscrowd=[int(s.get("iscrowd", 0)) for s in gt], image_size=gt_ids.shape)
