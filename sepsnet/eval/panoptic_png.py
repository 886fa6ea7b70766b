"""PQ input: COCO panoptic PNGs and in-memory id maps, as (H, W) integer id maps (0 = void).

A PNG is decoded by OpenCV straight to 32-bit ids: ``cvtColor`` BGR -> RGBA lays every pixel out as
the little-endian word ``R | G << 8 | B << 16 | A << 24``, and one AND drops the alpha byte, so no
int64 intermediate is ever made (the reference's ``rgb2id`` builds three int64 planes).
"""
from __future__ import annotations

import sys

import cv2
import numpy as np

from sepsnet.data.panoptic_ids import rgb_to_id
from sepsnet.errors import DataError

__all__ = ["as_id_map", "read_id_png", "rgb_to_id"]


def read_id_png(path: str) -> np.ndarray:
    """Read a COCO panoptic PNG into an (H, W) id map (uint32 for RGB; DataError if unreadable).

    8- and 16-bit grey PNGs are returned as they are (their value is the id)."""
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


def as_id_map(arr: np.ndarray, what: str) -> np.ndarray:
    """An in-memory id map: integer (H, W) as it is, (H, W, 3|4) uint8 RGB(A) converted;
    DataError naming ``what`` otherwise."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        return rgb_to_id(arr[..., :3])
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must be an integer (H, W) id map or (H, W, 3) uint8 RGB, "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    return arr
