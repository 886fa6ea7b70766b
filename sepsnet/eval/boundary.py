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
segments: a pixel lies in its segment's band exactly when another id (or the border) is within
Chebyshev distance d. Equivalently (walk a straight 8-connected path to the nearest foreign pixel)
it lies within distance d - 1 of an *edge* pixel, one with an 8-neighbour of another id, or within d
of the border. So the band is one uint8 dilation of the edge map by a (2d - 1)^2 square plus a frame,
for any id range.
"""
from __future__ import annotations

import cv2
import numpy as np

DEFAULT_DILATION_RATIO = 0.02


def boundary_width(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Band width d in pixels for an image of this size (at least 1)."""
    return max(1, int(round(dilation_ratio * float(np.hypot(height, width)))))


_EXACT_FLOAT32 = 1 << 24  # integer ids below this are exact in float32
_SQUARE3 = np.ones((3, 3), np.uint8)


def edge_map(id_map: np.ndarray) -> np.ndarray:
    """uint8 (H, W), 1 where a pixel has an 8-neighbour (inside the image) of another id.

    Ids in [0, 2^24) (every PNG id): 3x3 min != 3x3 max on float32 (exact there); others: the
    four neighbour directions compared in numpy (same result, slower)."""
    ids = np.asarray(id_map)
    if ids.size and 0 <= int(ids.min()) and int(ids.max()) < _EXACT_FLOAT32:
        f = ids.astype(np.float32)
        low = cv2.erode(f, _SQUARE3, borderType=cv2.BORDER_REPLICATE)
        high = cv2.dilate(f, _SQUARE3, borderType=cv2.BORDER_REPLICATE)
        return (low != high).view(np.uint8)
    edge = np.zeros(ids.shape, bool)
    for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),  # left-right
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),  # up-down
                 ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),  # diagonal
                 ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None)))):  # anti-diagonal
        differs = ids[a] != ids[b]
        edge[a] |= differs
        edge[b] |= differs
    return edge.view(np.uint8)


def boundary_band(id_map: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): pixels whose segment does not fill the (2*width+1)^2 window around them
    (another id, or the image border, within Chebyshev distance ``width``)."""
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"boundary_band needs an (H, W) id map, got shape {ids.shape}")
    band = edge_map(ids)
    if width > 1 and ids.size:
        band = cv2.dilate(band, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * width - 1, 2 * width - 1)),
                          borderType=cv2.BORDER_CONSTANT, borderValue=0)
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
