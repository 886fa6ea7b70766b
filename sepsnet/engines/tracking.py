"""Temporal identity for thing segments: ``track_id`` that persists across frames.

Each frame, the thing segments are matched to the live tracks by mask IoU (the panoptic map,
subsampled by ``stride``) or box IoU, one-to-one with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``), only within the same class and only above
``iou_thresh``. Unmatched segments open new tracks; a track without a match is kept for
``max_lost`` frames (so a missed detection or a short occlusion does not change the id), then
retired. Ids are never reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sepsnet.postprocess.results import PanopticResult


@dataclass
class Track:
    track_id: int
    category_id: int
    box: np.ndarray  # xyxy, frame pixels
    mask: np.ndarray | None  # flattened bool mask at 1/stride, or None (box matching)
    shape: tuple[int, int]  # frame (h, w) the mask belongs to
    lost: int = 0  # frames since the last match
    hits: int = 1


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,4) x (m,4) xyxy boxes -> (n,m) IoU."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,P) x (m,P) flattened bool masks -> (n,m) IoU."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)


class SegmentTracker:
    """Assigns ``segments_info[i]["track_id"]`` to the thing segments of consecutive results."""

    def __init__(self, iou_thresh: float = 0.3, max_lost: int = 5, match: str = "mask", stride: int = 4) -> None:
        if match not in ("mask", "box"):
            raise ValueError(f"match must be 'mask' or 'box', got {match!r}")
        if not 0.0 <= iou_thresh < 1.0 or max_lost < 0 or stride < 1:
            raise ValueError(f"need 0 <= iou_thresh < 1, max_lost >= 0, stride >= 1; got {iou_thresh}, "
                             f"{max_lost}, {stride}")
        self.iou_thresh, self.max_lost, self.match, self.stride = iou_thresh, max_lost, match, stride
        self.tracks: list[Track] = []
        self._next_id = 1

    def _detections(self, result: PanopticResult) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray | None]]:
        """(segment, xyxy box, flattened subsampled mask or None) per thing segment."""
        things = [s for s in result.segments_info if s.get("isthing")]
        if not things:
            return []
        small = None
        if self.match == "mask":
            small = result.id_map[::self.stride, ::self.stride].cpu().numpy().reshape(-1)
        out = []
        for s in things:
            x, y, w, h = (float(v) for v in s["bbox"])
            box = np.array([x, y, x + w, y + h], np.float32)
            out.append((s, box, None if small is None else small == s["id"]))
        return out

    def _iou(self, dets: list, shape: tuple[int, int]) -> np.ndarray:
        iou = np.zeros((len(dets), len(self.tracks)), np.float32)
        if not dets or not self.tracks:
            return iou
        boxes = np.stack([d[1] for d in dets])
        if self.match == "mask":
            same = [j for j, t in enumerate(self.tracks) if t.mask is not None and t.shape == shape]
            other = [j for j in range(len(self.tracks)) if j not in same]
            if same:
                iou[:, same] = mask_iou(np.stack([d[2] for d in dets]), np.stack([self.tracks[j].mask for j in same]))
            if other:  # the frame size changed: boxes are all there is to compare
                iou[:, other] = box_iou(boxes, np.stack([self.tracks[j].box for j in other]))
        else:
            iou = box_iou(boxes, np.stack([t.box for t in self.tracks]))
        det_cls = np.array([int(d[0]["category_id"]) for d in dets])
        trk_cls = np.array([t.category_id for t in self.tracks])
        iou[det_cls[:, None] != trk_cls[None, :]] = 0.0  # same class only
        return iou

    def update(self, result: PanopticResult) -> list[int]:
        """Match this frame's thing segments to the tracks; sets ``track_id`` on them (stuff
        segments get none) and returns the ids in ``segments_info`` order of the things."""
        shape = tuple(int(v) for v in result.id_map.shape[-2:])
        dets = self._detections(result)
        iou = self._iou(dets, shape)
        matched_det: dict[int, int] = {}
        if iou.size:
            rows, cols = linear_sum_assignment(iou, maximize=True)
            matched_det = {int(r): int(c) for r, c in zip(rows, cols) if iou[r, c] >= self.iou_thresh}
        matched_trk = set(matched_det.values())
        for j, t in enumerate(self.tracks):
            if j not in matched_trk:
                t.lost += 1
        ids = []
        for i, (seg, box, mask) in enumerate(dets):
            if i in matched_det:
                t = self.tracks[matched_det[i]]
                t.box, t.mask, t.shape, t.lost = box, mask, shape, 0
                t.hits += 1
            else:
                t = Track(self._next_id, int(seg["category_id"]), box, mask, shape)
                self._next_id += 1
                self.tracks.append(t)
            seg["track_id"] = t.track_id
            ids.append(t.track_id)
        self.tracks = [t for t in self.tracks if t.lost <= self.max_lost]
        return ids
