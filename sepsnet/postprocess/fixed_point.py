"""Sequential greedy decisions as a fixed point of fixed-shape tensor steps (DESIGN "Inference split",
device path): no host read, one final check.

Greedy NMS, silhouette dedup and the things pass of the fusion all decide items in a fixed order,
each decision depending only on the decisions before it: ``d[j] = f_j(d[0..j-1])``. Such a system
has exactly one solution (induction over the order), the sequential one, and the iteration
``d <- f(d)`` from any start reaches it: after ``t`` steps the first ``t`` items are right, and
an item whose dependencies form no chain longer than ``t`` is right too. Two equal successive
iterates are a fixed point, hence the sequential result. More finely, decisions over a prefix
depend only on that prefix, so when two successive iterates agree on positions ``0..p-1`` those
positions hold the sequential result (:func:`settled_prefix`), whatever happens further on.

A fixed number of steps runs without reading the device; whether it settled is one boolean per
image, read with the frame's results (the caller finishes the rare unsettled case another way).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def iterate(step: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
            iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` (>= 1) applications of ``step`` from ``start`` (bool (..., n) in the decision
    order) -> (last iterate, the one before it)."""
    prev, cur = start, step(start)
    for _ in range(iterations - 1):
        prev, cur = cur, step(cur)
    return cur, prev


def settled_prefix(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per row of bool (..., n) iterates: the length of the prefix on which they agree (n when
    equal), as int64 (...); that prefix holds the sequential result."""
    differ = cur != prev
    n = cur.shape[-1]
    first = differ.to(torch.uint8).argmax(-1)  # the first difference (0 when none: fixed by the any below)
    return torch.where(differ.any(-1), first, torch.full_like(first, n))


def greedy_suppression(suppress: torch.Tensor, valid: torch.Tensor,
                       iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS in the order of the last axis: item j is kept when valid and no kept earlier item
    ``i`` has ``suppress[..., i, j]`` (only ``i < j`` may be True). ``suppress`` (..., n, n) bool,
    ``valid`` (..., n) bool -> (keep, settled prefix length (...)): ``keep`` is exact on that
    prefix (:func:`settled_prefix`)."""
    weights = suppress.to(torch.float32 if suppress.shape[-1] < (1 << 24) else torch.float64)

    def step(keep: torch.Tensor) -> torch.Tensor:  # suppressors kept, counted by a product (exact integers)
        return valid & ~((keep.to(weights.dtype)[..., None, :] @ weights)[..., 0, :] > 0)

    cur, prev = iterate(step, valid, iterations)
    return cur, settled_prefix(cur, prev)
