"""COCO panoptic segment ids (``id = R + 256 G + 256^2 B``, 0 = void): numpy only, so that the
PQ tools can use them without importing the training stack (torch)."""
from __future__ import annotations

import numpy as np


def rgb_to_id(img: np.ndarray, bgr: bool = False) -> np.ndarray:
    """COCO panoptic id map ``R + 256 G + 256^2 B`` (int64) from an (H, W, 3|4) uint8 image."""
    img = np.asarray(img)
    r, b = (2, 0) if bgr else (0, 2)
    return (img[..., r].astype(np.int64) | (img[..., 1].astype(np.int64) << 8)
            | (img[..., b].astype(np.int64) << 16))
