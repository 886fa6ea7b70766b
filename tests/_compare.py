"""Order- and platform-independent comparisons of detections and per-location outputs.

Sorting two result lists by score and comparing them element-wise depends on how ties and
near-ties are ordered, which differs between CPUs and backends. These helpers compare by a stable
identity instead: an exact lexicographic order for results of one backend, and a one-to-one
assignment (Hungarian, scipy) for results of two backends whose values differ by rounding.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def lexicographic_order(scores: torch.Tensor, classes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Indices sorting detections by (-score, class, x0, y0, x1, y1): a total order, so equal sets of
    detections come out in the same order whatever order the ties had."""
    keys = np.concatenate([-scores.double().reshape(-1, 1).numpy(), classes.double().reshape(-1, 1).numpy(),
                           boxes.double().reshape(-1, 4).numpy()], axis=1)
    order = np.lexsort(keys.T[::-1])  # np.lexsort sorts by the last key first
    return torch.from_numpy(order.astype(np.int64))


def match_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-to-one pairing of the rows of ``a`` and ``b`` (same shape) minimising the summed L1
    distance: rows of two backends that hold the same entries in another order."""
    assert a.shape == b.shape, (a.shape, b.shape)
    cost = torch.cdist(a.double().reshape(len(a), -1), b.double().reshape(len(b), -1), p=1).numpy()
    ia, ib = linear_sum_assignment(cost)
    return torch.from_numpy(ia.astype(np.int64)), torch.from_numpy(ib.astype(np.int64))


def match_detections(boxes_a: torch.Tensor, classes_a: torch.Tensor, boxes_b: torch.Tensor,
                     classes_b: torch.Tensor, max_box_l1: float) -> tuple[list[int], list[int]]:
    """Pair detections of two backends: same class, box corners within ``max_box_l1`` pixels in
    total, one-to-one (Hungarian on the L1 distance). Returns the paired indices of a and b."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return [], []
    cost = torch.cdist(boxes_a.double(), boxes_b.double(), p=1).numpy()
    cost[classes_a.numpy()[:, None] != classes_b.numpy()[None, :]] = 1e9
    ia, ib = linear_sum_assignment(cost)
    keep = cost[ia, ib] <= max_box_l1
    return ia[keep].tolist(), ib[keep].tolist()
