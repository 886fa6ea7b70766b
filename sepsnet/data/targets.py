"""Panoptic id map + segments_info -> training targets (docs/INTERFACES.md)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sepsnet.data.metadata import ClassMetadata


def build_targets(id_map: np.ndarray, segments: list[dict[str, Any]], meta: ClassMetadata) -> dict[str, torch.Tensor]:
    """``boxes`` xyxy (G,4), ``classes`` (G,), ``masks`` uint8 (G,H,W), ``stuff`` (H,W):
    stuff classes 0..S-1, S = any thing pixel, 255 = void / crowd / unknown."""
    lookup = meta.lookup()
    num_stuff = len(meta.stuff)
    h, w = id_map.shape
    stuff = np.full((h, w), 255, dtype=np.int64)
    boxes, classes, masks = [], [], []
    for seg in segments:
        mask = id_map == int(seg["id"])
        if not mask.any():
            continue
        cat = int(seg["category_id"])
        if cat not in lookup:
            continue  # unknown category: stays ignore
        isthing, contiguous = lookup[cat]
        if not isthing:
            stuff[mask] = contiguous
            continue
        if seg.get("iscrowd", 0):
            continue  # crowd: not an instance, ignored in the stuff target
        stuff[mask] = num_stuff
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        classes.append(contiguous)
        masks.append(mask)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "classes": torch.tensor(classes, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks
        else torch.zeros((0, h, w), dtype=torch.uint8),
        "stuff": torch.from_numpy(stuff),
    }
