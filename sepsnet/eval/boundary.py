"""Boundary IoU and Boundary PQ (Cheng et al., CVPR 2021; reference [25] of the SE-PSNet paper).

SE-PSNet's silhouette features target the quality of mask contours (paper Sec. I, III-B), which
mask IoU on large segments barely sees. Boundary IoU compares only the contour bands:

    G_d = G minus its erosion by a (2d+1) x (2d+1) square,   the image border counting as outside,
    boundary IoU = |G_d and P_d| / |G_d or P_d|,   d = max(1, round(dilation_ratio * image diagonal))

(erosion by the square equals d erosions by 3x3, the definition of the Boundary IoU authors;
``dilation_ratio`` 0.02 by default). Boundary PQ is PQ with every pair's IoU replaced by
``min(mask IoU, boundary IoU)`` for matching and SQ; as for mask IoU, the prediction's band pixels
on ground-truth void leave the union. Void, crowd and false-positive rules are unchanged.

All segments of an id map are handled at once, so the cost does not grow with the number of
segments. A pixel lies in its segment's band exactly when another id (or the border) is within
Chebyshev distance d, i.e. (walking a straight 8-connected path to the nearest foreign pixel) when it
lies within distance d - 1 of an *edge* pixel, one with an 8-neighbour of another id. The edge
pixels are exactly the pixels of the non-uniform 2x2 blocks (the four pixels of a block are mutual
8-neighbours, and every 8-neighbour pair shares a block). So the band is one uint8 dilation of the
non-uniform-block map by a 2d x 2d square, plus a frame of width d, for ids of any range. The C
helper (``pq_native``) computes the same band with running box counts (O(1) per pixel for any d).
"""
from __future__ import annotations

import numpy as np

from sepsnet.eval import pq_native

DEFAULT_DILATION_RATIO = 0.02


def boundary_width(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Band width d in pixels for an image of this size (at least 1)."""
    return max(1, int(round(dilation_ratio * float(np.hypot(height, width)))))


def nonuniform_blocks(id_map: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 1 at the top-left pixel of every 2x2 block holding more than one id."""
    ids = np.asarray(id_map)
    h, w = ids.shape
    blocks = np.zeros((h, w), np.uint8)
    if h < 2 or w < 2:
        return blocks
    across = ids[:, 1:] != ids[:, :-1]  # (H, W-1)
    down = ids[1:] != ids[:-1]  # (H-1, W)
    out = blocks[:-1, :-1].view(bool)
    np.logical_or(across[:-1], across[1:], out=out)
    out |= down[:, :-1]
    out |= down[:, 1:]
    return blocks


def boundary_band(id_map: np.ndarray, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """bool (H, W): pixels whose segment does not fill the (2*width+1)^2 window around them
    (another id, or the image border, within Chebyshev distance ``width``). ``out``: a uint8 (H, W)
    array the C helper may write the band into."""
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"boundary_band needs an (H, W) id map, got shape {ids.shape}")
    native = pq_native.NATIVE
    if native is not None and ids.dtype.kind in "iu" and ids.dtype.itemsize in (4, 8):
        usable = out is not None and out.shape == ids.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        band = out if usable else np.empty(ids.shape, np.uint8)
        native.boundary_band(np.ascontiguousarray(ids), ids.shape[0], ids.shape[1], width, band,
                             pq_native.scratch("band_rows", ids.shape))
        return band.view(bool)
    import cv2  # the fallback only: the fast path runs without it (and without its import time)

    # block top-left t covers x when x - t lies in [-(width - 1), width] on both axes
    kernel = np.ones((2 * width, 2 * width), np.uint8)
    band = cv2.dilate(nonuniform_blocks(ids), kernel, anchor=(width, width),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0) if ids.size else np.zeros(ids.shape, np.uint8)
    band[:width] = 1
    band[-width:] = 1
    band[:, :width] = 1
    band[:, -width:] = 1
    return band.view(bool)


def boundary_iou(inter: np.ndarray, gt_band: np.ndarray, pred_band: np.ndarray,
                 pred_band_on_void: np.ndarray) -> np.ndarray:
    """Boundary IoU of segment pairs from their band pixel counts; the prediction's band pixels on
    gt void leave the union, as for mask IoU (0 where the union is empty)."""
    inter = inter.astype(np.float64)
    union = pred_band + gt_band - inter - pred_band_on_void
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)
