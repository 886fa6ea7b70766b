"""Panoptic Quality (PQ = SQ x RQ, paper Sec. 4 "Evaluation metrics"; Kirillov et al. 2019) with
exactly the semantics of the COCO panoptic API, and Boundary PQ (``sepsnet.eval.boundary``).

The pieces, each in its own module:

- ``panoptic_png``: PNG / array input -> (H, W) id maps;
- ``segment_overlap``: the per-pixel work, id maps -> overlap counts of segment pairs (run lengths);
- ``pq_core``: the algorithm of one image on those counts (matching, void, crowd, FP/FN rules);
- ``pq_summary``: PQ / SQ / RQ from the per-category sums, the text table;
- ``pq_files``: COCO panoptic JSON + PNG folders over a process pool (``sepsnet-pq``).

This module keeps the streaming form, :class:`PQAccumulator`, and the names the rest of sepsnet
imports from here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sepsnet.errors import DataError
from sepsnet.eval.panoptic_png import as_id_map, read_id_png, rgb_to_id
from sepsnet.eval.pq_core import VOID, PQStat, add_image, pq_image
from sepsnet.eval.pq_files import Categories, category_dict, default_workers, pq_compute_files, pq_compute_files_multi
from sepsnet.eval.pq_summary import format_table, pq_average, summarize

__all__ = ["VOID", "PQAccumulator", "PQStat", "default_workers", "format_table", "pq_average", "pq_compute_files",
           "pq_compute_files_multi", "pq_image", "read_id_png", "rgb_to_id", "summarize"]


class PQAccumulator:
    """Streaming PQ: ``add`` one image's gt and prediction at a time, then ``summary()``.
    With ``dilation_ratio`` (e.g. 0.02) it accumulates Boundary PQ instead."""

    def __init__(self, categories: Categories, dilation_ratio: float | None = None) -> None:
        self.categories = category_dict(categories)
        self.dilation_ratio = dilation_ratio
        self.stat = PQStat(list(self.categories))
        self.num_images = 0

    def add(self, gt_id_map: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
            pred_id_map: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
            image_id: Any = None) -> None:
        """Add one image (id maps as int (H, W) or RGB uint8; segments as COCO segments_info)."""
        image = self.num_images if image_id is None else image_id
        gt = as_id_map(gt_id_map, f"image {image} gt_id_map")
        pred = as_id_map(pred_id_map, f"image {image} pred_id_map")
        try:
            add_image([self.stat], [self.dilation_ratio], self.categories, gt, gt_segments, pred, pred_segments,
                      image)
        except (KeyError, TypeError) as exc:
            raise DataError(f"image {image}: malformed segments_info ({type(exc).__name__}: {exc})") from None
        self.num_images += 1

    def merge(self, other: PQAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another process)."""
        self.stat += other.stat
        self.num_images += other.num_images

    def summary(self) -> dict[str, Any]:
        return summarize(self.stat, self.categories)
