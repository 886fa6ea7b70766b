"""PQ of COCO panoptic files (reference ``pq_compute``): JSON + PNG folders, split over workers.

The images are dealt to ``workers`` workers in interleaved chunks; each worker decodes its PNG
pairs one at a time, adds them to its own per-category sums and returns only those sums (no
per-image state is kept). With the C helper (``pq_native``) the workers are threads: decoding,
bands and pair counting run in C with the GIL released, so threads use all cores without the
start-up and pickling of processes. Without it they are processes (the NumPy / OpenCV path holds
the GIL for much of its time).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sepsnet.errors import DataError
from sepsnet.eval import pq_native
from sepsnet.eval.panoptic_png import read_id_png
from sepsnet.eval.pq_core import PQStat, add_image
from sepsnet.eval.pq_summary import summarize

Categories = Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
Pair = tuple[dict, dict]  # (gt annotation, prediction annotation)


def category_dict(categories: Categories) -> dict[int, dict[str, Any]]:
    """Categories as ``{id: category}`` from the COCO list or a mapping."""
    if isinstance(categories, Mapping):
        return {int(k): dict(v) for k, v in categories.items()}
    out: dict[int, dict[str, Any]] = {}
    for c in categories:
        if "id" not in c or "isthing" not in c:
            raise DataError(f"category {c!r} needs the keys 'id' and 'isthing'")
        out[int(c["id"])] = dict(c)
    return out


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


def _image_pairs(gt_data: dict, pred_data: dict, gt_json: str, pred_json: str) -> list[Pair]:
    try:
        preds = {a["image_id"]: a for a in pred_data["annotations"]}
        pairs = []
        for gt_ann in gt_data["annotations"]:
            if gt_ann["image_id"] not in preds:
                raise DataError(f"no prediction for the image with id: {gt_ann['image_id']} in {pred_json}")
            pairs.append((gt_ann, preds[gt_ann["image_id"]]))
    except KeyError as exc:
        raise DataError(f"annotation without key {exc} in {gt_json} or {pred_json}") from None
    return pairs


def _chunk_stats(args: tuple[list[Pair], str, str, dict[int, dict[str, Any]], tuple[float | None, ...]]
                 ) -> list[PQStat]:
    """One PQStat per entry of ``ratios`` (None = mask PQ), every PNG pair decoded once."""
    pairs, gt_folder, pred_folder, categories, ratios = args
    stats = [PQStat(list(categories)) for _ in ratios]
    gt = pred = None
    for gt_ann, pred_ann in pairs:
        image = gt_ann.get("image_id", "?")
        try:  # the previous pair's memory is reused (same size: no new allocation, no page faults)
            gt = read_id_png(os.path.join(gt_folder, gt_ann["file_name"]), out=gt)
            pred = read_id_png(os.path.join(pred_folder, pred_ann["file_name"]), out=pred)
            add_image(stats, ratios, categories, gt, gt_ann.get("segments_info", []), pred,
                      pred_ann.get("segments_info", []), image)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"image {image}: malformed annotation ({type(exc).__name__}: {exc})") from None
    return stats


def default_workers() -> int:
    """The CPUs this process may run on (at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


def pq_compute_files(gt_json: str, pred_json: str, gt_folder: str | None = None,
                     pred_folder: str | None = None, workers: int | None = None,
                     dilation_ratio: float | None = None) -> dict[str, Any]:
    """PQ from COCO panoptic files (reference ``pq_compute``); ``workers=1`` runs in the calling thread.
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
    categories = category_dict(gt_data["categories"])
    pairs = _image_pairs(gt_data, pred_data, gt_json, pred_json)
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(pairs)))
    if workers == 1:
        stats = _chunk_stats((pairs, gt_folder, pred_folder, categories, ratios))
    else:
        n_chunks = min(len(pairs), workers * 4)
        chunks = [pairs[i::n_chunks] for i in range(n_chunks)]
        stats = [PQStat(list(categories)) for _ in ratios]
        if pq_native.NATIVE is None:
            from concurrent.futures import ProcessPoolExecutor as Executor
        else:
            from concurrent.futures import ThreadPoolExecutor as Executor
        with Executor(max_workers=workers) as pool:
            for parts in pool.map(_chunk_stats, [(c, gt_folder, pred_folder, categories, ratios) for c in chunks]):
                for stat, part in zip(stats, parts):
                    stat += part
    return [summarize(stat, categories) for stat in stats]
