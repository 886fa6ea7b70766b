"""Instance mask AP and box AP (COCO AP@[.5:.95], AP50, AP75, APs/m/l) through pycocotools.

Paper Sec. 4 reports mask AP next to PQ; this module feeds predicted instance masks (RLE via
``pycocotools.mask.encode``) and ground-truth instances (e.g. the thing segments of a panoptic
ground truth, crowd segments kept as ``iscrowd``) to ``COCOeval`` for ``segm`` and ``bbox``.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sepsnet.errors import DataError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _encode(masks: np.ndarray, h: int, w: int, what: str) -> list[dict]:
    masks = np.asarray(masks)
    if masks.size == 0:
        return []
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise DataError(f"{what} must have shape (n, {h}, {w}), got {masks.shape}")
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def instances_from_panoptic(id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]],
                            categories: Mapping[int, Mapping[str, Any]]
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thing segments of a panoptic id map -> (masks bool (n,H,W), category ids (n,), iscrowd (n,))."""
    segs = [s for s in segments_info if categories[int(s["category_id"])]["isthing"] == 1]
    masks = np.stack([id_map == int(s["id"]) for s in segs]) if segs else \
        np.zeros((0,) + tuple(id_map.shape), bool)
    cls = np.array([int(s["category_id"]) for s in segs], np.int64)
    crowd = np.array([int(s.get("iscrowd", 0)) for s in segs], np.int64)
    return masks, cls, crowd


class InstanceAPAccumulator:
    """Collect per-image gt and predicted instances, then ``summary()`` runs COCOeval."""

    def __init__(self, categories: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
                 max_dets: int = 100) -> None:
        cats = categories.values() if isinstance(categories, Mapping) else categories
        self.categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                           for c in cats if int(c.get("isthing", 1)) == 1]
        self._cat_ids = {c["id"] for c in self.categories}
        self.max_dets = max_dets
        self.images: list[dict] = []
        self._image_ids: set = set()
        self.gt: list[dict] = []
        self.dt: list[dict] = []

    def add(self, image_id: int, gt_masks: np.ndarray, gt_classes: Sequence[int],
            pred_masks: np.ndarray, pred_scores: Sequence[float], pred_classes: Sequence[int],
            gt_iscrowd: Sequence[int] | None = None, pred_boxes: np.ndarray | None = None,
            image_size: tuple[int, int] | None = None) -> None:
        """Add one image: gt masks (n,H,W) + dataset category ids, predicted masks (m,H,W),
        scores, category ids; optional predicted boxes (m,4) xyxy (else boxes of the masks)."""
        gt_masks, pred_masks = np.asarray(gt_masks), np.asarray(pred_masks)
        if image_size is not None:
            h, w = image_size
        elif gt_masks.ndim == 3:
            h, w = gt_masks.shape[1:]
        elif pred_masks.ndim == 3:
            h, w = pred_masks.shape[1:]
        else:
            raise DataError(f"image {image_id}: give image_size when there are no masks")
        if image_id in self._image_ids:
            raise DataError(f"image {image_id} added twice")
        gt_classes = [int(c) for c in gt_classes]
        crowd = [0] * len(gt_classes) if gt_iscrowd is None else [int(c) for c in gt_iscrowd]
        g_rles = _encode(gt_masks, h, w, f"image {image_id} gt_masks")
        if not (len(g_rles) == len(gt_classes) == len(crowd)):
            raise DataError(f"image {image_id}: {len(g_rles)} gt masks, {len(gt_classes)} classes, "
                            f"{len(crowd)} iscrowd flags")
        p_rles = _encode(pred_masks, h, w, f"image {image_id} pred_masks")
        scores, classes = list(map(float, pred_scores)), [int(c) for c in pred_classes]
        if not (len(p_rles) == len(scores) == len(classes)):
            raise DataError(f"image {image_id}: {len(p_rles)} predicted masks, {len(scores)} scores, "
                            f"{len(classes)} classes")
        for c in gt_classes + classes:
            if c not in self._cat_ids:
                raise DataError(f"image {image_id}: category_id {c} is not a thing category")
        if pred_boxes is None:
            boxes = [mask_utils.toBbox(r).tolist() for r in p_rles]
        else:
            xyxy = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
            if len(xyxy) != len(p_rles):
                raise DataError(f"image {image_id}: {len(xyxy)} boxes for {len(p_rles)} masks")
            boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in xyxy.tolist()]
        self._image_ids.add(image_id)
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        for rle, c, cr in zip(g_rles, gt_classes, crowd):
            self.gt.append({"id": len(self.gt) + 1, "image_id": image_id, "category_id": c,
                            "segmentation": rle, "area": float(mask_utils.area(rle)),
                            "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": cr})
        for rle, s, c, bbox in zip(p_rles, scores, classes, boxes):
            self.dt.append({"image_id": image_id, "category_id": c, "segmentation": rle,
                            "bbox": bbox, "score": s, "mask_area": float(mask_utils.area(rle))})

    def _coco(self, anns: list[dict]) -> COCO:
        coco = COCO()
        coco.dataset = {"images": list(self.images), "categories": list(self.categories),
                        "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _evaluate(self, iou_type: str) -> dict[str, float]:
        if not self.gt:
            return {k: float("nan") for k in STAT_NAMES}
        dts = []
        for i, d in enumerate(self.dt):
            x, y, bw, bh = d["bbox"]
            area = d["mask_area"] if iou_type == "segm" else bw * bh
            dts.append({"id": i + 1, "image_id": d["image_id"], "category_id": d["category_id"],
                        "segmentation": d["segmentation"], "bbox": d["bbox"], "score": d["score"],
                        "area": area, "iscrowd": 0})
        ev = COCOeval(self._coco(self.gt), self._coco(dts), iou_type)
        ev.params.maxDets = [1, 10, self.max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:6])}

    def summary(self) -> dict[str, dict[str, float]]:
        """``{'segm': {AP, AP50, AP75, APs, APm, APl}, 'bbox': {...}}`` in [0, 1] (-1: no gt in
        that area range, nan: no gt at all), COCOeval definitions."""
        return {"segm": self._evaluate("segm"), "bbox": self._evaluate("bbox")}
