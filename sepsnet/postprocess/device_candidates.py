"""Candidate selection in fixed shapes, without a host read (DESIGN "Inference split", device path).

The same selection as :func:`sepsnet.postprocess.candidates.select_candidates`, written so that no
tensor size depends on the data:

- per FPN level a top-k of ``prob * centerness`` over all (location, class) pairs with the ones at
  or below ``score_thresh`` set to -inf, ``k = min(pre_nms_topk, entries)``, and a validity mask
  (the pairs above the threshold), instead of ``nonzero`` + a top-k over a data-sized tensor. When
  more than k pairs pass, both keep the k best; otherwise the top-k holds every passing pair;
- boxes gathered, clipped to the resized image, emptied ones marked invalid instead of dropped;
- exact greedy class-aware NMS (:func:`nms_keep`) from the IoU suppression matrix of those
  candidates and the fixed-point iteration of :mod:`sepsnet.postprocess.fixed_point`, instead of
  torchvision's NMS (which returns a data-sized tensor);
- the ``max_instances`` best survivors gathered into that many slots per image, with a validity mask.

Exact against the host selection (tested with torchvision's ``batched_nms``): the candidates are
ranked by a stable descending sort of the FCOS score, and the IoU of each pair is torchvision's CPU
kernel expression (float32, compared with the threshold as in float64: :func:`float32_below`), on
the boxes ``batched_nms`` would use: shifted per class (its coordinate trick) up to 1000 boxes,
unshifted beyond. The
rule is applied on every device, so the CUDA device path gives the CPU result (torchvision's CUDA
kernel compares in float32). Equal FCOS scores are ranked by level and flat index here; the host
path's order for them is torchvision's, so exactness is claimed for distinct scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sepsnet.postprocess.fixed_point import greedy_suppression

#: torchvision's ``batched_nms`` shifts boxes per class up to this many coordinates on CPU
COORDINATE_TRICK_NUMEL = 4000
#: fixed-point steps of the NMS (a suppression chain longer than this is finished on the host). A
#: step is one (1 x n) @ (n x n) product; the trained demo model on the sample photos needs 8-10
NMS_ITERATIONS = 32


@dataclass
class SlotCandidates:
    """The candidates of a batch in ``M = max_instances`` slots per image, best score first; slots
    past an image's survivors hold zeros and are not ``valid``."""

    boxes: torch.Tensor  # float32 (B, M, 4) xyxy, network-input pixels, clipped
    scores: torch.Tensor  # float32 (B, M) FCOS score
    classes: torch.Tensor  # int64 (B, M)
    attention: torch.Tensor  # (B, M, K*M*M)
    valid: torch.Tensor  # bool (B, M)
    settled: torch.Tensor  # bool (B,): the NMS fixed point decided every slot (else finish on the host)


def level_candidates(scores: torch.Tensor, centerness: torch.Tensor, counts: Sequence[int],
                     pp: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per level the fixed top-k of ``prob * centerness`` (pairs at or below ``score_thresh`` at
    -inf), in (level, flat index) order -> location (B, N), class (B, N), value (B, N), valid (B, N)."""
    num_cls = scores.shape[-1]
    locs, clss, vals, oks = [], [], [], []
    start = 0
    for count in counts:
        prob = scores[:, start:start + count]  # (B, l, T)
        above = prob > pp.score_thresh
        val = torch.where(above, prob * centerness[:, start:start + count, None], float("-inf")).flatten(1)
        k = min(int(pp.pre_nms_topk), count * num_cls)
        top = val.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # flat indices, ascending
        locs.append(torch.div(top, num_cls, rounding_mode="floor") + start)
        clss.append(top % num_cls)
        vals.append(val.gather(1, top))
        oks.append(above.flatten(1).gather(1, top))
        start += count
    return torch.cat(locs, 1), torch.cat(clss, 1), torch.cat(vals, 1), torch.cat(oks, 1)


def float32_below(value: float) -> float:
    """The largest float32 ``<= value``: for a float32 ``x``, ``x > value`` (in float64, as
    torchvision's C++ compares) is ``x > float32_below(value)`` (a float32 comparison)."""
    f = float(np.float32(value))
    return f if f <= value else float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _iou_over(boxes: torch.Tensor) -> torch.Tensor:
    """(B, n, n) IoU of box i (row, the suppressor) with box j as torchvision's CPU NMS kernel
    computes it in the boxes' dtype: ``inter / (area_i + area_j - inter)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    # the same operations in place (a few (n, n) buffers at a time: n is up to 5 x pre_nms_topk)
    inter = torch.minimum(x2[:, :, None], x2[:, None, :]).sub_(torch.maximum(x1[:, :, None], x1[:, None, :]))
    inter.clamp_(min=0)
    h = torch.minimum(y2[:, :, None], y2[:, None, :]).sub_(torch.maximum(y1[:, :, None], y1[:, None, :]))
    inter.mul_(h.clamp_(min=0))
    del h
    union = (areas[:, :, None] + areas[:, None, :]).sub_(inter)
    return inter.div_(union)


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor,
             iou_thresh: float, iterations: int = NMS_ITERATIONS
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-aware greedy NMS of the valid boxes (B, n, 4) -> (order (B, n): candidates by descending
    score, stable; keep (B, n) bool in that order; settled prefix length (B,)). ``keep`` equals
    ``batched_nms(boxes[valid], scores[valid], classes[valid], iou_thresh)`` on the settled prefix."""
    n = scores.shape[1]
    order = torch.where(valid, scores, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    bx = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    cls = classes.gather(1, order)
    ok = valid.gather(1, order)
    # batched_nms's coordinate trick (up to COORDINATE_TRICK_NUMEL coordinates): boxes shifted by
    # class * (largest coordinate + 1), the largest taken over the valid boxes only
    largest = torch.where(ok[..., None], bx, float("-inf")).flatten(1).amax(1)
    shifted = bx + (cls.to(bx.dtype) * (largest[:, None] + 1))[..., None]
    trick = (ok.sum(1) * 4 <= COORDINATE_TRICK_NUMEL)[:, None, None]
    iou = _iou_over(torch.where(trick, shifted, bx))
    later = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(1)
    suppress = (iou > float32_below(iou_thresh)) & later & ok[:, :, None] & ok[:, None, :]
    suppress &= trick | (cls[:, :, None] == cls[:, None, :])
    keep, settled = greedy_suppression(suppress, ok, iterations)
    return order, keep, settled


def select_slot_candidates(boxes: torch.Tensor, scores: torch.Tensor, centerness: torch.Tensor,
                           attention: torch.Tensor, counts: Sequence[int], pp: Any,
                           image_sizes: Sequence[tuple[int, int]] | None = None,
                           iterations: int = NMS_ITERATIONS) -> SlotCandidates:
    """:func:`~sepsnet.postprocess.candidates.select_candidates` in fixed shapes (module docstring);
    ``counts``: entries per level (:func:`~sepsnet.postprocess.candidates.level_entries`)."""
    num_img = boxes.shape[0]
    m = int(pp.max_instances)
    loc, cls, val, ok = level_candidates(scores, centerness, counts, pp)
    fcos = val.clamp(min=0).sqrt()
    bx = boxes.gather(1, loc[..., None].expand(-1, -1, 4)).clone()
    if image_sizes is not None:
        for b, (h, w) in enumerate(image_sizes):
            bx[b, :, 0::2] = bx[b, :, 0::2].clamp(0, float(w))
            bx[b, :, 1::2] = bx[b, :, 1::2].clamp(0, float(h))
    ok &= (bx[..., 2] > bx[..., 0]) & (bx[..., 3] > bx[..., 1])
    order, keep, settled = nms_keep(bx.float(), fcos.float(), cls, ok, pp.nms_thresh, iterations)
    n = order.shape[1]
    if n < m:  # fewer candidates than slots: pad with invalid ones
        pad = m - n
        order = torch.cat([order, order.new_zeros(num_img, pad)], 1)
        keep = torch.cat([keep, keep.new_zeros(num_img, pad)], 1)
    taken = keep & (keep.cumsum(1) <= m)
    # slots: the taken candidates in score order first (stable sort of "not taken")
    slot = (~taken).to(torch.uint8).sort(dim=1, stable=True).indices[:, :m]
    valid = taken.gather(1, slot)
    src = order.gather(1, slot)  # candidate index per slot
    # settled when the prefix holding the first m survivors (or everything) is settled
    survivors_before = torch.cat([keep.new_zeros(num_img, 1, dtype=torch.long), keep.long().cumsum(1)], 1)
    settled = (settled >= n) | (survivors_before.gather(1, settled.clamp(max=n)[:, None])[:, 0] >= m)
    zero = torch.zeros((), dtype=bx.dtype, device=bx.device)
    return SlotCandidates(
        boxes=torch.where(valid[..., None], bx.gather(1, src[..., None].expand(-1, -1, 4)), zero),
        scores=torch.where(valid, fcos.gather(1, src), zero.to(fcos.dtype)),
        classes=torch.where(valid, cls.gather(1, src), 0),
        attention=attention.gather(1, loc.gather(1, src)[..., None].expand(-1, -1, attention.shape[-1])),
        valid=valid,
        settled=settled,
    )
