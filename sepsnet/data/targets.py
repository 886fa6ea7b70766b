"""Panoptic id map + COCO ``segments_info`` -> training targets (docs/INTERFACES.md
"Training targets"). Silhouette targets are derived by the model from ``masks``/``stuff``."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sepsnet.data.metadata import ClassMetadata

IGNORE = 255


def build_targets(id_map: np.ndarray, segments: list[dict[str, Any]], meta: ClassMetadata,
                  image_id: Any | None = None) -> dict[str, Any]:
    """``boxes`` xyxy float32 (G,4) (the tight box of the mask, x2/y2 exclusive),
    ``classes`` int64 (G,), ``masks`` uint8 (G,H,W), ``stuff`` int64 (H,W): stuff classes
    0..S-1, S = any (non-crowd) thing pixel, 255 = void / crowd / unknown category.
    Crowd thing segments are not instances. Segments absent from the map (e.g. resized away)
    are dropped. ``image_id`` is added when given (bookkeeping only)."""
    lookup = meta.lookup()
    num_stuff = len(meta.stuff)
    h, w = id_map.shape
    stuff = np.full((h, w), IGNORE, dtype=np.int64)
    boxes, classes, masks = [], [], []
    for seg in segments:
        cat = int(seg["category_id"])
        if cat not in lookup:
            continue  # unknown category: stays ignore
        mask = id_map == int(seg["id"])
        if not mask.any():
            continue
        isthing, contiguous = lookup[cat]
        if not isthing:
            stuff[mask] = contiguous
            continue
        if seg.get("iscrowd", 0):
            continue  # crowd: not an instance, ignored (255) in the stuff target
        stuff[mask] = num_stuff
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        boxes.append([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1])
        classes.append(contiguous)
        masks.append(mask)
    out: dict[str, Any] = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "classes": torch.tensor(classes, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks
        else torch.zeros((0, h, w), dtype=torch.uint8),
        "stuff": torch.from_numpy(stuff),
    }
    if image_id is not None:
        out["image_id"] = image_id
    return out
