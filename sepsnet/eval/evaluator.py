"""Run the model + shared post-processing over a dataset; report PQ and mask AP and write
predictions in COCO panoptic format (the same pipeline the engine runtime uses)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.transforms import collate
from sepsnet.eval.instance_ap import InstanceAPAccumulator
from sepsnet.eval.pq import PQAccumulator
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.writers import CityscapesPanopticWriter, CocoPanopticWriter, _remap, write_json


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: CocoPanopticDataset, cfg: SEPSNetConfig,
                   out_dir: Optional[Union[str, Path]] = None, max_images: Optional[int] = None,
                   batch_size: int = 1, with_ap: bool = True,
                   boundary_ratio: Optional[float] = None) -> dict[str, Any]:
    """PQ (COCO panoptic API semantics) over ``dataset`` (its GT PNGs at original size).

    Returns ``{"PQ", "SQ", "RQ", "PQ_th", "PQ_st", ..., "mask_AP", "seconds_per_image"}``;
    writes ``out_dir/panoptic_predictions{.json,/}`` and ``out_dir/metrics.json`` when given.
    ``boundary_ratio`` (e.g. 0.02) adds Boundary PQ (``PQ_boundary``, ``_th``, ``_st``), the
    contour-sensitive variant of ``sepsnet.eval.boundary``.
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
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    start = time.perf_counter()
    try:
        for first in range(0, n, batch_size):
            items = [dataset[i] for i in range(first, min(n, first + batch_size))]
            images, _, infos = collate(items, cfg.data.size_divisibility)
            dense = model.forward_dense(images.to(device))
            sizes = [(info["resized_size"], info["original_size"]) for info in infos]
            results = panoptic_inference(dense, model.forward_instances, sizes, cfg)
            for k, (res, info) in enumerate(zip(results, infos)):
                res = res.to("cpu")
                index = first + k
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
    summary = pq.summary()
    metrics: dict[str, Any] = {
        "PQ": summary["All"]["pq"], "SQ": summary["All"]["sq"], "RQ": summary["All"]["rq"],
        "PQ_th": summary["Things"]["pq"], "SQ_th": summary["Things"]["sq"], "RQ_th": summary["Things"]["rq"],
        "PQ_st": summary["Stuff"]["pq"], "SQ_st": summary["Stuff"]["sq"], "RQ_st": summary["Stuff"]["rq"],
        "images": n, "seconds_per_image": (time.perf_counter() - start) / max(n, 1),
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
        write_json(Path(out_dir) / "metrics.json", {**metrics, "per_class": summary.get("per_class")})
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
