"""Boundary IoU and Boundary PQ (Cheng et al., CVPR 2021; reference [25] of the SE-PSNet paper).

SE-PSNet's silhouette features target the quality of mask contours (paper Sec. I, III-B), which
mask IoU on large segments barely sees. Boundary IoU compares only the contour bands:

    G_d = G minus its erosion by a (2d+1) x (2d+1) square,   the image border counting as outside,
    boundary IoU = |G_d and P_d| / |G_d or P_d|,   d = max(1, round(dilation_ratio * image diagonal))

(erosion by the square equals d erosions by 3x3, the definition of the Boundary IoU authors;
``dilation_ratio`` 0.02 by default). Boundary PQ is PQ with every pair's IoU replaced by
``min(mask IoU, boundary IoU)`` for matching and SQ; as for mask IoU, the prediction's band pixels
on ground-truth void leave the union. Void, crowd and false-positive rules are unchanged.

All segments of an id map are handled at once: a pixel lies in its segment's band exactly when
the min and max id over its window differ (``cv2.erode`` / ``cv2.dilate`` of the id map, with a
one-pixel border of a foreign value), so the cost does not grow with the number of segments.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_DILATION_RATIO = 0.02
_EXACT_FLOAT32 = 1 << 24  # integer ids below this are exact in float32


def boundary_width(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Band width d in pixels for an image of this size (at least 1)."""
    return max(1, int(round(dilation_ratio * float(np.hypot(height, width)))))


def boundary_band(id_map: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): pixels whose segment does not fill the (2*width+1)^2 window around them
    (another id, or the image border, within Chebyshev distance ``width``)."""
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"boundary_band needs an (H, W) id map, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(ids.shape, bool)
    if int(ids.min()) < 0 or int(ids.max()) >= _EXACT_FLOAT32:
        ids = np.unique(ids, return_inverse=True)[1].reshape(ids.shape)  # dense labels, same partition
    padded = cv2.copyMakeBorder(ids.astype(np.float32), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=-1.0)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    low = cv2.erode(padded, kernel)[1:-1, 1:-1]
    high = cv2.dilate(padded, kernel)[1:-1, 1:-1]
    return low != high


@dataclass
class BoundaryOverlap:
    """Band pixel counts of one image, indexed like the mask confusion matrix of ``pq_image``."""

    inter: np.ndarray  # (G, P) band pixels shared by gt row g and prediction column p
    gt_area: np.ndarray  # (G,) band pixels per gt row
    pred_area: np.ndarray  # (P,) band pixels per prediction column
    pred_on_void: np.ndarray  # (P,) prediction band pixels on gt void

    def iou(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Boundary IoU of the pairs (rows[i], cols[i])."""
        inter = self.inter[rows, cols].astype(np.float64)
        union = self.pred_area[cols] + self.gt_area[rows] - inter - self.pred_on_void[cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def boundary_overlap(gt: np.ndarray, pred: np.ndarray, gt_index: np.ndarray, pred_index: np.ndarray,
                     key: np.ndarray, n_gt: int, n_pred: int, void_index: int,
                     dilation_ratio: float = DEFAULT_DILATION_RATIO) -> BoundaryOverlap:
    """Band counts from the per-pixel indices ``pq_image`` already has.

    ``gt_index`` / ``pred_index``: per pixel, 0 for unknown ids else 1 + position in the sorted id
    list; ``key = gt_index * n_pred + pred_index``; ``void_index``: the gt index of void. Rows and
    columns come back in id order (index 1..), the unknown index 0 last, like ``pq_image``'s matrix.
    """
    d = boundary_width(gt.shape[0], gt.shape[1], dilation_ratio)
    gband = boundary_band(gt, d)
    pband = boundary_band(pred, d)
    both = gband & pband
    inter = np.bincount(key[both], minlength=n_gt * n_pred).reshape(n_gt, n_pred)
    gt_area = np.bincount(gt_index[gband], minlength=n_gt)
    pred_area = np.bincount(pred_index[pband], minlength=n_pred)
    pred_on_void = np.bincount(pred_index[pband & (gt_index == void_index)], minlength=n_pred)
    rg, rp = np.r_[1:n_gt, 0], np.r_[1:n_pred, 0]
    return BoundaryOverlap(inter[rg][:, rp], gt_area[rg], pred_area[rp], pred_on_void[rp])
