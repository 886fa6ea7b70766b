"""Candidate selection on the dense outputs (DESIGN "Inference split", step 2).

FCOS test-time selection with the AdelaiDet defaults: class probability above
``score_thresh``, pre-NMS top-k per FPN level ranked by ``prob * centerness``,
FCOS score ``sqrt(prob * centerness)``, boxes clipped to the resized (unpadded)
image, class-aware NMS (:func:`torchvision.ops.batched_nms`), at most
``max_instances`` kept per image.

Greedy NMS decides a box from the higher-scoring boxes only, so when just the best
``max_instances`` survivors are wanted, NMS over the top-scoring prefix of the candidates keeps
exactly the full run's survivors within that prefix; :func:`class_nms_top` grows the prefix until
it holds ``max_instances`` survivors (CPU, where thousands of low-score candidates dominate the
time), with the same per-class :func:`torchvision.ops.nms` calls as ``batched_nms``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

from sepsnet.errors import ConfigError
from sepsnet.postprocess.preselect import Preselect
from sepsnet.postprocess.threads import one_intra_op_thread

#: torchvision's ``batched_nms`` runs one ``nms`` per class above this many box coordinates on CPU
#: (below it, one ``nms`` on class-offset boxes); :func:`class_nms_top` takes a prefix only there
_VANILLA_NMS_NUMEL = 4000
#: first NMS prefix: this many candidates per wanted survivor (grown x4 while too few survive)
_PREFIX_PER_KEEP = 4


@dataclass
class Candidates:
    """Instances of one image kept by NMS, sorted by descending FCOS score."""

    boxes: torch.Tensor  # float32 (n, 4) xyxy, network-input pixels
    scores: torch.Tensor  # float32 (n,) FCOS score sqrt(prob * centerness)
    classes: torch.Tensor  # int64 (n,) contiguous thing class
    attention: torch.Tensor  # float32 (n, K*M*M)
    batch_index: torch.Tensor  # int64 (n,) image index in the batch

    def __len__(self) -> int:
        return int(self.scores.numel())


def postprocess_cfg(cfg: Any) -> Any:
    """Accept either a full ``SEPSNetConfig`` or its ``PostprocessConfig`` section."""
    return cfg.postprocess if hasattr(cfg, "postprocess") else cfg


def level_sizes(p3_hw: Sequence[int], num_levels: int = 5) -> list[tuple[int, int]]:
    """(h, w) of P3..P7 from P3's size: each next level is (ceil(h/2), ceil(w/2))."""
    h, w = int(p3_hw[0]), int(p3_hw[1])
    sizes = []
    for _ in range(num_levels):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


def level_entries(p3_hw: Sequence[int], preselect: Preselect | Mapping[str, Any] | None = None,
                  num_levels: int = 5) -> list[int]:
    """Entries per FPN level in the dense outputs: h*w of every level (``preselect`` None), or for
    a dense engine that pre-selects the top-k locations per level (:class:`Preselect`; the
    manifest's mapping is accepted too) ``min(topk, h*w)``, or ``topk`` when padded."""
    counts = [h * w for h, w in level_sizes(p3_hw, num_levels)]
    sel = Preselect.coerce(preselect)
    if sel is None:
        return counts
    return [sel.topk] * len(counts) if sel.padded else [min(sel.topk, c) for c in counts]


def _check_shapes(boxes: torch.Tensor, scores: torch.Tensor, centerness: torch.Tensor,
                  attention: torch.Tensor, counts: Sequence[int]) -> None:
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ConfigError(f"select_candidates: boxes must be (N,L,4), got {tuple(boxes.shape)}")
    n, num_loc = boxes.shape[:2]
    expect = {"scores": (n, num_loc), "centerness": (n, num_loc), "attention": (n, num_loc)}
    for name, t in (("scores", scores), ("centerness", centerness), ("attention", attention)):
        if tuple(t.shape[:2]) != expect[name]:
            raise ConfigError(f"select_candidates: {name} shape {tuple(t.shape)} does not match "
                              f"boxes (N,L)=({n},{num_loc})")
    total = sum(counts)
    if total != num_loc:
        raise ConfigError(f"select_candidates: levels of {list(counts)} entries give {total} locations, "
                          f"dense outputs have L={num_loc} (a dense engine with per-level pre-selection "
                          "needs its top-k, see level_entries)")


def select_candidates(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    centerness: torch.Tensor,
    attention: torch.Tensor,
    level_sizes: Sequence[tuple[int, int] | int],
    cfg: Any,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Candidates]:
    """Per image :class:`Candidates` from the dense engine outputs (INTERFACES.md).

    ``level_sizes``: per FPN level its (h, w), or its number of entries (:func:`level_entries`).
    ``image_sizes``: per image the resized, unpadded (h, w) the boxes are clipped to;
    boxes left empty by clipping are dropped. ``cfg``: config or postprocess section.
    """
    pp = postprocess_cfg(cfg)
    counts = [int(v) if isinstance(v, int) else int(v[0]) * int(v[1]) for v in level_sizes]
    _check_shapes(boxes, scores, centerness, attention, counts)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    with one_intra_op_thread(boxes.device):  # small operations (same results with any thread count)
        return [_select_image(b, boxes, scores, centerness, attention, starts, pp, image_sizes)
                for b in range(boxes.shape[0])]


def _select_image(b: int, boxes: torch.Tensor, scores: torch.Tensor, centerness: torch.Tensor,
                  attention: torch.Tensor, starts: Sequence[int], pp: Any,
                  image_sizes: Sequence[tuple[int, int]] | None) -> Candidates:
    """:func:`select_candidates` for image ``b``."""
    counts = [e - s for s, e in zip(starts[:-1], starts[1:])]
    loc_list, cls_list, val_list = [], [], []
    num_cls = scores.shape[-1]
    on_host = scores.device.type == "cpu"
    for lvl in range(len(counts)):
        s, e = starts[lvl], starts[lvl + 1]
        prob = scores[b, s:e].reshape(-1)  # (l * T,), a view of the (l, T) block
        above = prob > pp.score_thresh
        # flat indices loc * T + cls, ascending (row-major like (l, T).nonzero()); NumPy's is the faster on CPU
        flat = torch.from_numpy(np.flatnonzero(above.numpy())) if on_host else above.nonzero().squeeze(1)
        if flat.numel() == 0:
            continue
        loc = torch.div(flat, num_cls, rounding_mode="floor")
        val = prob[flat] * centerness[b, s + loc]  # the values masked_select gives, in the same order
        if val.numel() > pp.pre_nms_topk:
            val, top = val.topk(pp.pre_nms_topk, sorted=False)
            flat, loc = flat[top], loc[top]
        loc_list.append(loc + s)
        cls_list.append(flat - loc * num_cls)
        val_list.append(val)
    if loc_list:
        loc = torch.cat(loc_list)
        cls = torch.cat(cls_list)
        fcos = torch.cat(val_list).clamp(min=0).sqrt()
    else:
        loc = torch.zeros(0, dtype=torch.int64, device=boxes.device)
        cls = loc.clone()
        fcos = torch.zeros(0, dtype=boxes.dtype, device=boxes.device)
    bx = boxes[b, loc].clone()
    if image_sizes is not None:
        h, w = image_sizes[b]
        bx[:, 0::2] = bx[:, 0::2].clamp(0, float(w))
        bx[:, 1::2] = bx[:, 1::2].clamp(0, float(h))
    valid = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
    bx, cls, fcos, loc = bx[valid], cls[valid], fcos[valid], loc[valid]
    keep = class_nms_top(bx.float(), fcos.float(), cls, pp.nms_thresh, pp.max_instances)  # sorted by score
    return Candidates(
        boxes=bx[keep],
        scores=fcos[keep],
        classes=cls[keep],
        attention=attention[b, loc[keep]],
        batch_index=torch.full((keep.numel(),), b, dtype=torch.int64, device=boxes.device),
    )


def _per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Bool (n,) survivors of one :func:`torchvision.ops.nms` per class (``batched_nms``'s CPU form)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(classes):
        idx = torch.where(classes == c)[0]
        keep[idx[nms(boxes[idx], scores[idx], iou)]] = True
    return keep


def class_nms_top(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float,
                  max_keep: int) -> torch.Tensor:
    """``batched_nms(boxes, scores, classes, iou)[:max_keep]`` (indices, descending score).

    On CPU with many candidates: class-wise NMS on the ``4 * max_keep`` best-scoring candidates,
    the prefix grown x4 until ``max_keep`` survive or it holds all (a prefix never ends inside a
    group of equal scores). Survivors in a prefix are the full run's survivors there (a box is
    dropped only by a higher-scoring kept box of its class), so the first ``max_keep`` agree."""
    n = int(scores.numel())
    if boxes.device.type != "cpu" or boxes.numel() <= _VANILLA_NMS_NUMEL or max_keep <= 0 \
            or n <= _PREFIX_PER_KEEP * max_keep:
        return batched_nms(boxes, scores, classes, iou)[:max(max_keep, 0)]
    order = scores.argsort(descending=True)
    ranked = scores[order]
    m = _PREFIX_PER_KEEP * max_keep
    while True:
        if m < n and bool(ranked[m - 1] == ranked[m]):  # do not cut a group of equal scores
            m = max(m, int((ranked >= ranked[m - 1]).sum()))
        top = order[:m].sort().values  # index order, as batched_nms passes each class to nms
        kept = top[_per_class_nms(boxes[top], scores[top], classes[top], iou)]
        if kept.numel() >= max_keep or m >= n:
            break
        m = min(n, m * 4)
    return kept[scores[kept].sort(descending=True)[1]][:max_keep]
