"""Panoptic Quality (PQ = SQ x RQ, paper Sec. 4 "Evaluation metrics"; Kirillov et al. 2019).

Exactly the semantics of the COCO panoptic API (``panopticapi.evaluation.pq_compute``):
void label 0, IoU > 0.5 same-category matching where the prediction's pixels on gt void are
left out of the union, crowd gt segments never matched, and an unmatched prediction is not a
false positive when more than half of it lies on void plus the same-class crowd segment listed
last in the ground truth's ``segments_info`` (list order, not id order, as in the reference).
Ground-truth areas come from the JSON (as in the reference), prediction areas from the PNG.

Per image one bincount over a combined key ``gt_index * K_pred + pred_index`` gives the whole
gt x pred intersection matrix (indices from ``np.searchsorted`` over the JSON ids); files are
processed in parallel with a process pool. ``PQAccumulator`` is the streaming form used during
evaluation; ``pq_compute_files`` the file form behind ``sepsnet-pq``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Union

import cv2
import numpy as np

from sepsnet.data.coco_panoptic import rgb_to_id
from sepsnet.errors import DataError
from sepsnet.eval.boundary import boundary_overlap

VOID = 0

Categories = Union[Mapping[int, Mapping[str, Any]], Sequence[Mapping[str, Any]]]


def _category_dict(categories: Categories) -> dict[int, dict[str, Any]]:
    if isinstance(categories, Mapping):
        return {int(k): dict(v) for k, v in categories.items()}
    out: dict[int, dict[str, Any]] = {}
    for c in categories:
        if "id" not in c or "isthing" not in c:
            raise DataError(f"category {c!r} needs the keys 'id' and 'isthing'")
        out[int(c["id"])] = dict(c)
    return out


def read_id_png(path: str) -> np.ndarray:
    """Read a COCO panoptic PNG into an (H, W) id map (uint32 for RGB; DataError if unreadable)."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"cannot read panoptic PNG {path} (missing or not an image)")
    if img.ndim == 2 and img.dtype in (np.uint8, np.uint16):
        return img
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise DataError(f"panoptic PNG {path} must be 8-bit RGB(A), got shape {img.shape} {img.dtype}")
    if sys.byteorder != "little":  # pragma: no cover
        return rgb_to_id(img[..., :3], bgr=True)
    code = cv2.COLOR_BGR2RGBA if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    ids = cv2.cvtColor(img, code).view(np.uint32)[..., 0]  # R | G << 8 | B << 16 | A << 24
    np.bitwise_and(ids, 0xFFFFFF, out=ids)
    return ids


def _as_id_map(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        return rgb_to_id(arr[..., :3])
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must be an integer (H, W) id map or (H, W, 3) uint8 RGB, "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


_LUT_SIZE = 1 << 24  # PNG ids are 24-bit
_tls = threading.local()


def _index(ids: np.ndarray, values: np.ndarray, bounded: bool = False) -> np.ndarray:
    """Per pixel: ``j + 1`` where the id is ``values[j]`` (sorted), 0 for ids not in ``values``.

    A per-thread 2^24-entry lookup table when ids are 24-bit (``bounded`` or checked), else
    ``np.searchsorted``."""
    n = len(values)
    if n < 65535 and (bounded or ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < _LUT_SIZE)):
        lut = getattr(_tls, "lut", None)
        if lut is None:
            lut = _tls.lut = np.zeros(_LUT_SIZE, np.uint16)
        ok = (values >= 0) & (values < _LUT_SIZE)
        lut[values[ok]] = np.arange(1, n + 1, dtype=np.uint16)[ok]
        try:
            return np.take(lut, ids)
        finally:
            lut[values[ok]] = 0
    idx = np.searchsorted(values, ids)
    ext = np.append(values, np.iinfo(np.int64).max)
    known = ext[idx] == ids
    idx += 1
    idx[~known] = 0
    return idx


def _segment_dict(segments: Sequence[Mapping[str, Any]], what: str) -> dict[int, Mapping[str, Any]]:
    out: dict[int, Mapping[str, Any]] = {}
    for s in segments:
        sid = int(s["id"])
        if sid in out:
            raise DataError(f"{what}: segment id {sid} appears twice in segments_info")
        out[sid] = s
    return out


class PQStat:
    """Per-category sums (iou, tp, fp, fn), indexed like ``cat_ids``."""

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


def pq_image(stat: PQStat, categories: Mapping[int, Mapping[str, Any]], gt: np.ndarray,
             gt_segments: Sequence[Mapping[str, Any]], pred: np.ndarray,
             pred_segments: Sequence[Mapping[str, Any]], image: Any = "?", bounded: bool = False,
             dilation_ratio: float | None = None) -> None:
    """Add one image's matches to ``stat`` (reference: ``pq_compute_single_core`` loop body).

    ``bounded``: the caller guarantees ids in [0, 2^24) (read from PNG). ``dilation_ratio``: score
    Boundary PQ instead (pair IoU = min(mask IoU, boundary IoU), see ``sepsnet.eval.boundary``).
    The result depends on ``segments_info`` order only where the reference's does (the crowd
    region kept per class); a segment id listed twice is a DataError (the reference silently
    keeps the last entry)."""
    if gt.shape != pred.shape:
        raise DataError(f"image {image}: gt id map {gt.shape} and prediction {pred.shape} differ in size")
    gt_segms = _segment_dict(gt_segments, f"image {image} ground truth")
    pred_segms = _segment_dict(pred_segments, f"image {image} prediction")
    gvals = np.array(sorted(set(gt_segms) | {VOID}), np.int64)
    pvals = np.array(sorted(set(pred_segms) | {VOID}), np.int64)
    gi = _index(gt, gvals, bounded)
    pi = _index(pred, pvals, bounded)
    kg, kp = len(gvals) + 1, len(pvals) + 1
    key = gi.astype(np.int64 if kg * kp >= 2 ** 31 else np.int32)
    key *= kp
    key += pi
    conf = np.bincount(key.ravel(), minlength=kg * kp).reshape(kg, kp)
    conf = conf[np.r_[1:kg, 0]][:, np.r_[1:kp, 0]]  # rows / columns as gvals / pvals, unknown last

    # prediction sanity checks (same errors as the reference)
    if conf[:, -1].any():
        bad = np.unique(pred[pi == 0])
        raise DataError(f"In the image with ID {image} segment with ID {int(bad[0])} is presented in "
                        f"PNG and not presented in JSON (unknown PNG ids: {bad[:10].tolist()}).")
    parea = conf[:, :-1].sum(0)
    p_is_seg = np.array([int(v) in pred_segms for v in pvals])
    for j, v in enumerate(pvals.tolist()):
        if p_is_seg[j] and parea[j] > 0 and int(pred_segms[v]["category_id"]) not in categories:
            raise DataError(f"In the image with ID {image} segment with ID {v} has unknown "
                            f"category_id {pred_segms[v]['category_id']}.")
    missing = [v for j, v in enumerate(pvals.tolist()) if p_is_seg[j] and parea[j] == 0]
    if missing:
        raise DataError(f"In the image with ID {image} the following segment IDs {missing} are "
                        "presented in JSON and not presented in PNG.")

    gpix = conf.sum(1)
    g_void = int(np.searchsorted(gvals, VOID))
    gseg = [j for j, v in enumerate(gvals.tolist()) if v in gt_segms]
    pseg = [j for j in range(len(pvals)) if p_is_seg[j]]
    ginfo = [gt_segms[int(gvals[j])] for j in gseg]
    pinfo = [pred_segms[int(pvals[j])] for j in pseg]
    gcat = np.array([int(s["category_id"]) for s in ginfo], np.int64)
    pcat = np.array([int(s["category_id"]) for s in pinfo], np.int64)
    gcrowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in ginfo], bool)
    garea = np.array([s["area"] if "area" in s else gpix[j] for s, j in zip(ginfo, gseg)], np.float64)
    pa = parea[pseg]
    inter = conf[np.ix_(gseg, pseg)]
    pvoid = conf[g_void, pseg]

    # matches: same category, non-crowd gt, IoU > 0.5 (pred pixels on void leave the union)
    cand = (inter > 0) & ~gcrowd[:, None] & (gcat[:, None] == pcat[None, :])
    gm, pm = np.nonzero(cand)
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = inter[gm, pm] / (pa[pm] + garea[gm] - inter[gm, pm] - pvoid[pm])
    if dilation_ratio is not None and len(gm):
        band = boundary_overlap(gt, pred, gi, pi, key, kg, kp, g_void + 1, dilation_ratio)
        ious = np.minimum(ious, band.iou(np.asarray(gseg)[gm], np.asarray(pseg)[pm]))
    ok = ious > 0.5
    gm, pm, ious = gm[ok], pm[ok], ious[ok]
    ci = stat.cat_index
    for g, iou in zip(gm.tolist(), ious.tolist()):
        k = ci[int(gcat[g])]
        stat.tp[k] += 1
        stat.iou[k] += iou
    g_matched = np.zeros(len(gseg), bool)
    g_matched[gm] = True
    p_matched = np.zeros(len(pseg), bool)
    p_matched[pm] = True

    # false negatives (crowd gt never counts)
    for g in np.nonzero(~g_matched & ~gcrowd)[0].tolist():
        k = ci.get(int(gcat[g]))
        if k is not None:  # gt of a category outside the list: ignored, as in the reference
            stat.fn[k] += 1
    # one crowd region per category: the last in segments_info order wins, as in the reference
    # (which fills its dict iterating segments_info), so walk the list, not the sorted ids
    crowd_of_cat: dict[int, int] = {}
    for s in gt_segments:
        if int(s.get("iscrowd", 0)) == 1:
            crowd_of_cat[int(s["category_id"])] = int(np.searchsorted(gvals, int(s["id"])))

    # false positives: unmatched predictions not mostly on void + same-class crowd
    for p in np.nonzero(~p_matched)[0].tolist():
        c = int(pcat[p])
        ign = int(pvoid[p])
        if c in crowd_of_cat:
            ign += int(conf[crowd_of_cat[c], pseg[p]])
        if ign / int(pa[p]) > 0.5:
            continue
        stat.fp[ci[c]] += 1


def pq_average(stat: PQStat, categories: Mapping[int, Mapping[str, Any]],
               isthing: bool | None) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Mean PQ/SQ/RQ over categories with any tp/fp/fn (reference ``PQStat.pq_average``)."""
    pq = sq = rq = 0.0
    n = 0
    per_class: dict[int, dict[str, float]] = {}
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        k = stat.cat_index[label]
        iou, tp, fp, fn = float(stat.iou[k]), int(stat.tp[k]), int(stat.fp[k]), int(stat.fn[k])
        if tp + fp + fn == 0:
            per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denom = tp + 0.5 * fp + 0.5 * fn
        per_class[label] = {"pq": iou / denom, "sq": iou / tp if tp else 0.0, "rq": tp / denom}
        pq += per_class[label]["pq"]
        sq += per_class[label]["sq"]
        rq += per_class[label]["rq"]
    if n == 0:  # the reference divides by zero here; we report zeros
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def summarize(stat: PQStat, categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``{'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class': {cat_id: {pq, sq, rq}}}``."""
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = pq_average(stat, categories, isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


class PQAccumulator:
    """Streaming PQ: ``add`` one image's gt and prediction at a time, then ``summary()``.
    With ``dilation_ratio`` (e.g. 0.02) it accumulates Boundary PQ instead."""

    def __init__(self, categories: Categories, dilation_ratio: float | None = None) -> None:
        self.categories = _category_dict(categories)
        self.dilation_ratio = dilation_ratio
        self.stat = PQStat(list(self.categories))
        self.num_images = 0

    def add(self, gt_id_map: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
            pred_id_map: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
            image_id: Any = None) -> None:
        """Add one image (id maps as int (H, W) or RGB uint8; segments as COCO segments_info)."""
        image = self.num_images if image_id is None else image_id
        try:
            pq_image(self.stat, self.categories, _as_id_map(gt_id_map, f"image {image} gt_id_map"),
                     gt_segments, _as_id_map(pred_id_map, f"image {image} pred_id_map"),
                     pred_segments, image, dilation_ratio=self.dilation_ratio)
        except (KeyError, TypeError) as exc:
            raise DataError(f"image {image}: malformed segments_info ({type(exc).__name__}: {exc})") from None
        self.num_images += 1

    def merge(self, other: PQAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another process)."""
        self.stat += other.stat
        self.num_images += other.num_images

    def summary(self) -> dict[str, Any]:
        return summarize(self.stat, self.categories)


def _chunk_stats(args: tuple[list[tuple[dict, dict]], str, str, dict[int, dict[str, Any]],
                                tuple[float | None, ...]]) -> list[PQStat]:
    """One PQStat per entry of ``ratios`` (None = mask PQ), every PNG pair decoded once."""
    pairs, gt_folder, pred_folder, categories, ratios = args
    stats = [PQStat(list(categories)) for _ in ratios]
    for gt_ann, pred_ann in pairs:
        try:
            gt = read_id_png(os.path.join(gt_folder, gt_ann["file_name"]))
            pred = read_id_png(os.path.join(pred_folder, pred_ann["file_name"]))
            for stat, ratio in zip(stats, ratios):
                pq_image(stat, categories, gt, gt_ann.get("segments_info", []), pred,
                         pred_ann.get("segments_info", []), gt_ann.get("image_id", "?"), bounded=True,
                         dilation_ratio=ratio)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"image {gt_ann.get('image_id', '?')}: malformed annotation "
                            f"({type(exc).__name__}: {exc})") from None
    return stats


def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{what} JSON {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} JSON {path} is malformed: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{what} JSON {path} has no 'annotations' list")
    return data


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def pq_compute_files(gt_json: str, pred_json: str, gt_folder: str | None = None,
                     pred_folder: str | None = None, workers: int | None = None,
                     dilation_ratio: float | None = None) -> dict[str, Any]:
    """PQ from COCO panoptic files (reference ``pq_compute``); ``workers=1`` runs in-process.
    ``dilation_ratio``: Boundary PQ instead (``sepsnet.eval.boundary``)."""
    return pq_compute_files_multi(gt_json, pred_json, gt_folder, pred_folder, workers, (dilation_ratio,))[0]


def pq_compute_files_multi(gt_json: str, pred_json: str, gt_folder: str | None = None,
                           pred_folder: str | None = None, workers: int | None = None,
                           ratios: Sequence[float | None] = (None,)) -> list[dict[str, Any]]:
    """One summary per entry of ``ratios`` (None = mask PQ, else Boundary PQ at that dilation
    ratio) from a single pass over the files."""
    ratios = tuple(ratios)
    gt_data = _load_json(gt_json, "ground-truth")
    pred_data = _load_json(pred_json, "prediction")
    gt_folder = gt_folder or os.path.splitext(gt_json)[0]
    pred_folder = pred_folder or os.path.splitext(pred_json)[0]
    for folder, what in ((gt_folder, "ground truth"), (pred_folder, "predicted")):
        if not os.path.isdir(folder):
            raise DataError(f"Folder {folder} with {what} segmentations doesn't exist")
    if not isinstance(gt_data.get("categories"), list):
        raise DataError(f"ground-truth JSON {gt_json} has no 'categories' list")
    categories = _category_dict(gt_data["categories"])
    try:
        preds = {a["image_id"]: a for a in pred_data["annotations"]}
        pairs = []
        for gt_ann in gt_data["annotations"]:
            if gt_ann["image_id"] not in preds:
                raise DataError(f"no prediction for the image with id: {gt_ann['image_id']} in {pred_json}")
            pairs.append((gt_ann, preds[gt_ann["image_id"]]))
    except KeyError as exc:
        raise DataError(f"annotation without key {exc} in {gt_json} or {pred_json}") from None
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(pairs)))
    if workers == 1:
        stats = _chunk_stats((pairs, gt_folder, pred_folder, categories, ratios))
    else:
        n_chunks = min(len(pairs), workers * 4)
        chunks = [pairs[i::n_chunks] for i in range(n_chunks)]
        stats = [PQStat(list(categories)) for _ in ratios]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for parts in pool.map(_chunk_stats, [(c, gt_folder, pred_folder, categories, ratios) for c in chunks]):
                for stat, part in zip(stats, parts):
                    stat += part
    return [summarize(stat, categories) for stat in stats]


def format_table(results: Mapping[str, Any]) -> str:
    """The reference's text table (PQ/SQ/RQ in percent, N categories)."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    return "\n".join(lines)


