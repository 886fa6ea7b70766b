"""The PQ algorithm of one image (paper Sec. 4 "Evaluation metrics"; Kirillov et al. 2019), on
overlap counts (``segment_overlap.Overlaps``) and the two ``segments_info`` lists; no pixels here.

Exactly the semantics of the COCO panoptic API (``panopticapi.evaluation.pq_compute_single_core``):
void label 0; a gt and a prediction of one category match when IoU > 0.5, where the prediction's
pixels on gt void leave the union; crowd gt segments never match; an unmatched prediction is not
a false positive when more than half of it lies on void plus the same-class crowd segment listed
*last* in the ground truth's ``segments_info`` (list order, as in the reference). Ground-truth
areas come from the JSON (as in the reference), prediction areas from the pixels. Boundary PQ
(``dilation_ratio``) replaces each pair's IoU by min(mask IoU, boundary IoU) (``boundary``).

    pq_image = check_prediction -> match_pairs -> add_true_positives -> add_false_negatives
               -> add_false_positives
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sepsnet.errors import DataError
from sepsnet.eval.boundary import boundary_iou
from sepsnet.eval.segment_overlap import IN_GT_BAND, IN_PRED_BAND, Overlaps, image_overlaps

VOID = 0


class PQStat:
    """Per-category sums (iou, tp, fp, fn), indexed like ``cat_ids``: all that PQ keeps."""

    def __init__(self, cat_ids: Sequence[int]) -> None:
        self.cat_ids = list(cat_ids)
        self.cat_index = {c: i for i, c in enumerate(self.cat_ids)}
        n = len(self.cat_ids)
        self.iou = np.zeros(n, np.float64)
        self.tp = np.zeros(n, np.int64)
        self.fp = np.zeros(n, np.int64)
        self.fn = np.zeros(n, np.int64)

    def __iadd__(self, other: PQStat) -> PQStat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass
class Segments:
    """One ``segments_info`` list as arrays, in list order."""

    ids: np.ndarray  # (S,) int64
    category: np.ndarray  # (S,) int64
    crowd: np.ndarray  # (S,) bool
    area: np.ndarray | None  # (S,) float64 JSON areas (ground truth only; NaN where absent)

    @classmethod
    def parse(cls, segments: Sequence[Mapping[str, Any]], what: str, with_area: bool) -> Segments:
        ids = [int(s["id"]) for s in segments]
        if len(set(ids)) != len(ids):
            seen: set[int] = set()
            dup = next(v for v in ids if v in seen or seen.add(v))
            raise DataError(f"{what}: segment id {dup} appears twice in segments_info")
        return cls(np.array(ids, np.int64), np.array([int(s["category_id"]) for s in segments], np.int64),
                   np.array([int(s.get("iscrowd", 0)) == 1 for s in segments], bool),
                   np.array([float(s.get("area", np.nan)) for s in segments], np.float64) if with_area else None)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Position in the list of each id, -1 for ids not listed."""
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        order = np.argsort(self.ids)
        listed = self.ids[order]
        pos = np.minimum(np.searchsorted(listed, ids), len(order) - 1)
        return np.where(listed[pos] == ids, order[pos], -1)


@dataclass
class ImagePairs:
    """The overlap pairs of one image with both sides located in their ``segments_info``."""

    g: np.ndarray  # (K,) gt list position, -1 = not listed (void or unknown id)
    p: np.ndarray  # (K,) prediction list position, -1 = not listed
    gt_void: np.ndarray  # (K,) bool, the gt pixel id is VOID
    pixels: np.ndarray  # (K,) int64
    band: np.ndarray | None  # (K, 4) int64, see Overlaps


def check_prediction(ov: Overlaps, pred: Segments, categories: Mapping[int, Any], image: Any) -> np.ndarray:
    """The reference's sanity checks (same messages); returns the area of each listed prediction."""
    p = pred.find(ov.pred)
    unknown = np.unique(ov.pred[(p < 0) & (ov.pred != VOID)])
    if len(unknown):
        raise DataError(f"In the image with ID {image} segment with ID {int(unknown[0])} is presented in "
                        f"PNG and not presented in JSON (unknown PNG ids: {unknown[:10].tolist()}).")
    area = np.bincount(p[p >= 0], weights=ov.pixels[p >= 0], minlength=len(pred.ids)).astype(np.int64)
    for i in np.nonzero(area > 0)[0].tolist():
        if int(pred.category[i]) not in categories:
            raise DataError(f"In the image with ID {image} segment with ID {int(pred.ids[i])} has unknown "
                            f"category_id {int(pred.category[i])}.")
    if (area == 0).any():
        raise DataError(f"In the image with ID {image} the following segment IDs "
                        f"{sorted(pred.ids[area == 0].tolist())} are presented in JSON and not presented in PNG.")
    return area


def locate_pairs(ov: Overlaps, gt: Segments, pred: Segments) -> ImagePairs:
    return ImagePairs(gt.find(ov.gt), pred.find(ov.pred), ov.gt == VOID, ov.pixels, ov.band)


def per_prediction(values: np.ndarray, pairs: ImagePairs, mask: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``values`` over the pairs in ``mask``, per listed prediction."""
    keep = mask & (pairs.p >= 0)
    return np.bincount(pairs.p[keep], weights=values[keep], minlength=n)


def match_pairs(pairs: ImagePairs, gt: Segments, pred: Segments, pred_area: np.ndarray,
                pred_on_void: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched (gt position, prediction position, IoU): same category, non-crowd gt, IoU > 0.5.

    With band counts the IoU is min(mask IoU, boundary IoU) (Boundary PQ)."""
    cand = np.nonzero((pairs.g >= 0) & (pairs.p >= 0))[0]
    g, p = pairs.g[cand], pairs.p[cand]
    same = ~gt.crowd[g] & (gt.category[g] == pred.category[p])
    cand, g, p = cand[same], g[same], p[same]
    inter = pairs.pixels[cand]
    gt_area = gt.area[g]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (pred_area[p] + gt_area - inter - pred_on_void[p])
    if pairs.band is not None and len(cand):
        band = pairs.band
        in_gt_band = band[:, IN_GT_BAND] + band[:, IN_GT_BAND | IN_PRED_BAND]
        in_pred_band = band[:, IN_PRED_BAND] + band[:, IN_GT_BAND | IN_PRED_BAND]
        gt_band = np.bincount(pairs.g[pairs.g >= 0], weights=in_gt_band[pairs.g >= 0], minlength=len(gt.ids))
        n_pred = len(pred.ids)
        pred_band = per_prediction(in_pred_band, pairs, np.ones(len(band), bool), n_pred)
        pred_band_void = per_prediction(in_pred_band, pairs, pairs.gt_void, n_pred)
        both = band[cand, IN_GT_BAND | IN_PRED_BAND]
        iou = np.minimum(iou, boundary_iou(both, gt_band[g], pred_band[p], pred_band_void[p]))
    ok = iou > 0.5
    return g[ok], p[ok], iou[ok]


def add_true_positives(stat: PQStat, gt: Segments, g: np.ndarray, iou: np.ndarray) -> None:
    k = np.array([stat.cat_index[int(c)] for c in gt.category[g].tolist()], np.int64)
    np.add.at(stat.tp, k, 1)
    np.add.at(stat.iou, k, iou)


def add_false_negatives(stat: PQStat, gt: Segments, matched: np.ndarray) -> None:
    """Unmatched non-crowd gt (a category outside the list is ignored, as in the reference)."""
    for c in gt.category[~matched & ~gt.crowd].tolist():
        k = stat.cat_index.get(int(c))
        if k is not None:
            stat.fn[k] += 1


def crowd_region_of_category(gt: Segments) -> dict[int, int]:
    """Category -> list position of its crowd segment: the last listed one wins, as in the
    reference (which fills a dict walking ``segments_info``)."""
    return {int(gt.category[i]): i for i in np.nonzero(gt.crowd)[0].tolist()}


def add_false_positives(stat: PQStat, pairs: ImagePairs, gt: Segments, pred: Segments, matched: np.ndarray,
                        pred_area: np.ndarray, pred_on_void: np.ndarray) -> None:
    """Unmatched predictions, unless more than half lies on void + the same-class crowd region."""
    crowd = crowd_region_of_category(gt)
    crowd_of_pred = np.array([crowd.get(int(c), -2) for c in pred.category.tolist()], np.int64)
    listed = pairs.p >= 0
    on_crowd = np.zeros(len(pairs.p), bool)
    on_crowd[listed] = pairs.g[listed] == crowd_of_pred[pairs.p[listed]]
    ignored = pred_on_void + per_prediction(pairs.pixels, pairs, on_crowd, len(pred.ids))
    for i in np.nonzero(~matched & ~(ignored / pred_area > 0.5))[0].tolist():
        stat.fp[stat.cat_index[int(pred.category[i])]] += 1


def pq_image(stat: PQStat, categories: Mapping[int, Mapping[str, Any]], overlaps: Overlaps,
             gt_segments: Sequence[Mapping[str, Any]], pred_segments: Sequence[Mapping[str, Any]],
             image: Any = "?") -> None:
    """Add one image's matches to ``stat`` (reference: the ``pq_compute_single_core`` loop body).

    The result depends on ``segments_info`` order only where the reference's does (the crowd
    region kept per class); a segment id listed twice is a DataError (the reference silently
    keeps the last entry). Boundary PQ when ``overlaps`` carries band counts."""
    gt = Segments.parse(gt_segments, f"image {image} ground truth", with_area=True)
    pred = Segments.parse(pred_segments, f"image {image} prediction", with_area=False)
    pred_area = check_prediction(overlaps, pred, categories, image)
    pairs = locate_pairs(overlaps, gt, pred)
    no_area = np.isnan(gt.area)
    if no_area.any():  # no JSON area: the pixel count
        gt.area[no_area] = np.bincount(pairs.g[pairs.g >= 0], weights=pairs.pixels[pairs.g >= 0],
                                       minlength=len(gt.ids))[no_area]
    pred_on_void = per_prediction(pairs.pixels, pairs, pairs.gt_void, len(pred.ids))
    g, p, iou = match_pairs(pairs, gt, pred, pred_area, pred_on_void)
    add_true_positives(stat, gt, g, iou)
    gt_matched = np.zeros(len(gt.ids), bool)
    gt_matched[g] = True
    pred_matched = np.zeros(len(pred.ids), bool)
    pred_matched[p] = True
    add_false_negatives(stat, gt, gt_matched)
    add_false_positives(stat, pairs, gt, pred, pred_matched, pred_area, pred_on_void)


def add_image(stats: Sequence[PQStat], ratios: Sequence[float | None], categories: Mapping[int, Mapping[str, Any]],
              gt: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], pred: np.ndarray,
              pred_segments: Sequence[Mapping[str, Any]], image: Any = "?") -> None:
    """One image into one ``PQStat`` per entry of ``ratios`` (None: mask PQ, else Boundary PQ at
    that dilation ratio); the pixels are counted once per distinct ratio (mask PQ reuses a
    boundary count)."""
    counted: dict[float | None, Overlaps] = {}
    for ratio in sorted(set(ratios), key=lambda r: r is None):
        if ratio is None and counted:
            counted[None] = replace(next(iter(counted.values())), band=None)
        else:
            counted[ratio] = image_overlaps(gt, pred, ratio, image)
    for stat, ratio in zip(stats, ratios):
        pq_image(stat, categories, counted[ratio], gt_segments, pred_segments, image)
