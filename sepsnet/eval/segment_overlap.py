"""Pixel counts shared by ground-truth and predicted segments: the only per-pixel work of PQ.

Panoptic id maps are piecewise constant, so both are read as runs: in row-major order a new run
starts wherever the gt id, the prediction id (or, for Boundary PQ, the band membership) changes.
Three comparisons and one ``flatnonzero`` per image find the run starts (a 1024x2048 pair with
~80 segments each has ~20k runs for 2M pixels); everything after works on the runs only: the ids at
each start, the run lengths, and one weighted ``bincount`` over the distinct
(gt id, prediction id[, band code]) keys. No lookup table, no per-pixel index map, no int64 copy of
the id maps.

With the C helper (``pq_native``) the same run-length walk is one pass over the pixels in C, each
run added to a hash table of (gt id, prediction id) pairs, with the GIL released; the NumPy code
below is the fallback and the reference the tests compare it with.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from sepsnet.errors import DataError
from sepsnet.eval import pq_native
from sepsnet.eval.boundary import boundary_band, boundary_width

# band code of a pixel: bit 0 in the gt band, bit 1 in the prediction band
IN_GT_BAND, IN_PRED_BAND = 1, 2


@dataclass
class Overlaps:
    """Every (gt id, prediction id) pair that shares pixels in one image, with the shared count.

    ``band`` (Boundary PQ only): (K, 4) pixels of each pair by band code (0: in neither band,
    1: in the gt band only, 2: in the prediction band only, 3: in both)."""

    gt: np.ndarray  # (K,) gt id
    pred: np.ndarray  # (K,) prediction id
    pixels: np.ndarray  # (K,) int64
    band: np.ndarray | None = None  # (K, 4) int64


def _run_starts(maps: list[np.ndarray]) -> np.ndarray:
    """Flat indices where any of the equally shaped ``maps`` changes value (0 always included)."""
    flat = [m.reshape(-1) for m in maps]
    change = np.empty(flat[0].size, bool)
    change[:1] = True
    np.not_equal(flat[0][1:], flat[0][:-1], out=change[1:])
    scratch = np.empty(max(flat[0].size - 1, 0), bool)
    for f in flat[1:]:
        np.not_equal(f[1:], f[:-1], out=scratch)
        np.logical_or(change[1:], scratch, out=change[1:])
    return np.flatnonzero(change)


def segment_overlaps(gt: np.ndarray, pred: np.ndarray, gt_band: np.ndarray | None = None,
                     pred_band: np.ndarray | None = None) -> Overlaps:
    """Overlap counts of two (H, W) integer id maps of one size (any integer dtype, any id range).

    With the bool maps ``gt_band`` and ``pred_band`` the counts are also split by band code."""
    native = pq_native.NATIVE
    if native is not None and gt.size and _native_ids(gt, pred):
        return _native_overlaps(native, gt, pred, gt_band, pred_band)
    if gt.size == 0:
        empty = np.zeros(0, np.int64)
        return Overlaps(empty, empty, empty, None if gt_band is None else np.zeros((0, 4), np.int64))
    maps = [gt, pred]
    code = None
    if gt_band is not None and pred_band is not None:
        code = gt_band.view(np.uint8) | (pred_band.view(np.uint8) << 1)
        maps.append(code)
    starts = _run_starts(maps)
    lengths = np.diff(starts, append=gt.size)
    gt_ids, gi = np.unique(gt.reshape(-1)[starts], return_inverse=True)
    pred_ids, pi = np.unique(pred.reshape(-1)[starts], return_inverse=True)
    key = gi.astype(np.int64) * len(pred_ids) + pi
    if code is not None:
        key = key * 4 + code.reshape(-1)[starts]
    keys, inverse = np.unique(key, return_inverse=True)
    counts = np.bincount(inverse, weights=lengths).astype(np.int64)  # float sums of ints < 2^53: exact
    if code is None:
        pairs, band = keys, None
    else:
        pairs, slot = np.unique(keys // 4, return_inverse=True)
        band = np.zeros((len(pairs), 4), np.int64)
        band[slot, keys % 4] = counts
        counts = band.sum(1)
    return Overlaps(gt_ids[pairs // len(pred_ids)], pred_ids[pairs % len(pred_ids)], counts, band)


def _native_ids(gt: np.ndarray, pred: np.ndarray) -> bool:
    """Whether the C helper takes these maps: one 4- or 8-byte integer type, C-contiguous."""
    return (gt.dtype == pred.dtype and gt.dtype.kind in "iu" and gt.dtype.itemsize in (4, 8)
            and gt.flags.c_contiguous and pred.flags.c_contiguous)


def _native_overlaps(native: ModuleType, gt: np.ndarray, pred: np.ndarray, gt_band: np.ndarray | None,
                     pred_band: np.ndarray | None) -> Overlaps:
    with_band = gt_band is not None and pred_band is not None
    bands = (np.ascontiguousarray(gt_band).view(np.uint8), np.ascontiguousarray(pred_band).view(np.uint8)) \
        if with_band else ()
    g, p, counts = native.count_pairs(gt, pred, *bands)
    # the helper returns the ids' bits widened to 64; back to the maps' own type
    g = np.frombuffer(g, np.uint64).astype(gt.dtype)
    p = np.frombuffer(p, np.uint64).astype(pred.dtype)
    if not with_band:
        return Overlaps(g, p, np.frombuffer(counts, np.int64).copy())
    band = np.frombuffer(counts, np.int64).reshape(-1, 4).copy()
    return Overlaps(g, p, band.sum(1), band)


def image_overlaps(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float | None = None,
                   image: object = "?") -> Overlaps:
    """``segment_overlaps`` of one image; with ``dilation_ratio`` also split by the boundary bands
    of width ``boundary_width(H, W, dilation_ratio)`` (Boundary PQ)."""
    if gt.shape != pred.shape:
        raise DataError(f"image {image}: gt id map {gt.shape} and prediction {pred.shape} differ in size")
    if dilation_ratio is None:
        return segment_overlaps(gt, pred)
    d = boundary_width(gt.shape[0], gt.shape[1], dilation_ratio)
    gt_band = boundary_band(gt, d, out=pq_native.scratch("gt_band", gt.shape))
    pred_band = boundary_band(pred, d, out=pq_native.scratch("pred_band", pred.shape))
    return segment_overlaps(gt, pred, gt_band, pred_band)
