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


class _Scoring:
    """PQ / Boundary PQ / mask AP accumulators and the prediction writers of one evaluation run."""

    def __init__(self, dataset: CocoPanopticDataset, cfg: SEPSNetConfig, out_dir: str | Path | None,
                 with_ap: bool, boundary_ratio: float | None) -> None:
        self.meta = dataset.meta
        self.out_dir = out_dir
        categories = self.meta.categories()
        self.pq = PQAccumulator(categories)
        self.bpq = PQAccumulator(categories, dilation_ratio=boundary_ratio) if boundary_ratio else None
        self.ap = InstanceAPAccumulator(categories) if with_ap else None
        self.writers: list[Any] = []
        if out_dir:
            self.writers.append(CocoPanopticWriter(out_dir, self.meta.to_dict()))
            if cfg.data.format == "cityscapes":  # also the Cityscapes panoptic format
                self.writers.append(CityscapesPanopticWriter(out_dir, self.meta.to_dict()))
        self.thing_ids = [t["id"] for t in self.meta.things]
        self.dataset = dataset

    def add(self, res: Any, index: int, image_id: Any, file_name: str) -> None:
        """One prediction (at the original resolution) against the ground truth of sample ``index``."""
        res = res.to("cpu")
        gt_ids, gt_segments = self.dataset.load_gt(index)
        pred_ids, pred_segs = _remap(res, self.meta.to_dict(), False)
        self.pq.add(gt_ids, gt_segments, pred_ids, pred_segs, image_id=image_id)
        if self.bpq is not None:
            self.bpq.add(gt_ids, gt_segments, pred_ids, pred_segs, image_id=image_id)
        for writer in self.writers:
            writer.add(res, image_id, file_name)
        if self.ap is not None:
            _add_ap(self.ap, index, gt_ids, gt_segments, res, self.thing_ids)

    def finish(self, n: int, skipped: list[str], seconds: float) -> dict[str, Any]:
        if n and len(skipped) == n:
            raise DataError(f"no readable image to evaluate: all {n} skipped (first: {skipped[0]})")
        evaluated = n - len(skipped)
        summary = self.pq.summary()
        metrics: dict[str, Any] = {
            "PQ": summary["All"]["pq"], "SQ": summary["All"]["sq"], "RQ": summary["All"]["rq"],
            "PQ_th": summary["Things"]["pq"], "SQ_th": summary["Things"]["sq"], "RQ_th": summary["Things"]["rq"],
            "PQ_st": summary["Stuff"]["pq"], "SQ_st": summary["Stuff"]["sq"], "RQ_st": summary["Stuff"]["rq"],
            "images": evaluated, "skipped": len(skipped), "seconds_per_image": seconds / max(evaluated, 1),
        }
        if self.bpq is not None:
            bsum = self.bpq.summary()
            metrics.update({"PQ_boundary": bsum["All"]["pq"], "PQ_boundary_th": bsum["Things"]["pq"],
                            "PQ_boundary_st": bsum["Stuff"]["pq"]})
        if self.ap is not None:
            ap_summary = self.ap.summary()
            metrics["mask_AP"] = ap_summary.get("segm", {}).get("AP", float("nan"))
            metrics["box_AP"] = ap_summary.get("bbox", {}).get("AP", float("nan"))
        for writer in self.writers:
            writer.close()
        if self.out_dir:
            write_json(Path(self.out_dir) / "metrics.json",
                       {**metrics, "skipped_files": skipped, "per_class": summary.get("per_class")})
        return metrics


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
    scoring = _Scoring(dataset, cfg, out_dir, with_ap, boundary_ratio)
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
                # the sample actually loaded: its own ground truth
                scoring.add(res, info["index"], info["image_id"], info["file_name"])
    finally:
        if was_training:
            model.train()
    return scoring.finish(n, skipped, time.perf_counter() - start)


@torch.no_grad()
def evaluate_predictor(predictor: Any, dataset: CocoPanopticDataset, cfg: SEPSNetConfig,
                       out_dir: str | Path | None = None, max_images: int | None = None, with_ap: bool = True,
                       boundary_ratio: float | None = None, skip_bad: bool | None = None) -> dict[str, Any]:
    """:func:`evaluate_model`'s evaluation through a ``PanopticPredictor`` (an exported bundle, any backend):
    each image is given to the predictor as the original RGB frame, exactly as a deployment would, so its
    preprocessing (the bundle's static input size, if any), engines and post-processing are what is scored.
    Same metrics, files and bad-image handling as :func:`evaluate_model`."""
    classes = predictor.classes
    if (len(classes["things"]), len(classes["stuff"])) != (len(dataset.meta.things), len(dataset.meta.stuff)):
        raise DataError(f"{dataset.json_path} has {len(dataset.meta.things)} thing / {len(dataset.meta.stuff)} "
                        f"stuff classes but the bundle has {len(classes['things'])} / {len(classes['stuff'])}")
    scoring = _Scoring(dataset, cfg, out_dir, with_ap, boundary_ratio)
    skip_bad = dataset.skip_bad if skip_bad is None else skip_bad
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    skipped: list[str] = []
    start = time.perf_counter()
    for i in range(n):
        try:
            image, _, rec = dataset.load_raw(i)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(dataset.records[i]["image_path"]))
            log.warning("evaluation: skipping bad image %s (%s)", dataset.records[i]["image_path"], exc)
            continue
        scoring.add(predictor(image), i, rec["image"]["id"], rec["image"]["file_name"])
    return scoring.finish(n, skipped, time.perf_counter() - start)


def _add_ap(ap: InstanceAPAccumulator, image_id: int, gt_ids: np.ndarray, segments: list[dict[str, Any]],
            res: Any, thing_ids: list[int]) -> None:
    gt = [s for s in segments if s["category_id"] in set(thing_ids)]
    gt_masks = np.stack([gt_ids == s["id"] for s in gt]) if gt else np.zeros((0, *gt_ids.shape), bool)
    masks = res.instance_masks
    pred_masks = masks.numpy().astype(bool) if masks is not None and len(masks) else np.zeros((0, *gt_ids.shape), bool)
    classes = [thing_ids[int(c)] for c in res.instance_classes.tolist()]
    ap.add(image_id, gt_masks, [s["category_id"] for s in gt], pred_masks, res.instance_scores.tolist(), classes,
           gt_iscrowd=[int(s.get("iscrowd", 0)) for s in gt], image_size=gt_ids.shape)
