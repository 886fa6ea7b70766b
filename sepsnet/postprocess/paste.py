"""Paste R x R mask probabilities into the image at their boxes (DESIGN "Inference split", step 4).

Geometry (same as detectron2's ``paste_masks_in_image`` / ``grid_sample(align_corners=False)``
over the box): the R x R mask covers the continuous box [x0, x1] x [y0, y1]; image pixel
(y, x) has its centre at (y + 0.5, x + 0.5) and samples the mask at continuous mask coordinate
``u = (x + 0.5 - x0) / (x1 - x0) * R - 0.5`` (mask pixel centres at integers), bilinearly,
with zeros outside the mask. A pixel is foreground when the sampled probability is
``>= threshold``. Bilinear sampling is separable, so each mask is pasted as
``Wy @ mask @ Wx^T`` with (h, R) and (w, R) interpolation matrices: exact and free of per-pixel
Python loops.

Each mask is pasted only inside its *region* (its box grown by half a mask pixel, clipped to
the image: outside it the sampled value is 0) and kept as a crop of that size
(:class:`PastedMasks`), never as a full-image plane, so memory and work follow the boxes'
areas, not instances x image pixels. Crops beyond a byte budget are not kept but pasted again
when asked for (pasting is deterministic, the crop is the same).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.threads import host_workers, on_host_workers, one_intra_op_thread

#: crops kept in memory per image (bool bytes); beyond it they are pasted again on demand
CROP_BUDGET_BYTES = 256 << 20
#: a larger region is pasted in row bands (bounds the float32 scratch to ~4 bytes x this)
BAND_PIXELS = 1 << 24
#: on CPU, region pixels per host worker thread from which the boxes are shared among the intra-op
#: threads the caller allows (below it one thread pastes them all)
HOST_SPLIT_PIXELS = 1 << 18
#: float32 scratch kept per host thread and use (paste weights and products), bytes
SCRATCH_KEEP_BYTES = 32 << 20
#: on CPU paste with :func:`_paste_host`; False runs the per-box torch form used on other devices
#: (tests run it on CPU)
PASTE_ON_HOST = True


def _interp_weights(coord0: torch.Tensor, size: torch.Tensor, pix: torch.Tensor, r: int) -> torch.Tensor:
    """(n, P, r) bilinear weights of pixels ``pix`` (P,) for boxes starting at ``coord0`` with
    extent ``size`` (n,), zero padding outside the r mask cells: ``1 - f`` at cell ``floor(u)``,
    ``f`` at the next one (written by scatter into zeros; the same values as the one-hot sum
    ``(1 - f) * [cell == u0] + f * [cell == u0 + 1]``)."""
    u = (pix[None, :].to(coord0.dtype) + 0.5 - coord0[:, None]) / size.clamp(min=1e-6)[:, None] * r - 0.5  # (n, P)
    u0 = torch.floor(u)
    f = u - u0
    u0 = u0.long()
    # two padding cells (index 0 and r + 1) absorb taps outside the mask, then are cut off
    out = torch.zeros((*u.shape, r + 2), dtype=u.dtype, device=u.device)
    lo = (u0 + 1).clamp(0, r + 1)
    hi = (u0 + 2).clamp(0, r + 1)
    out.scatter_(2, lo[..., None], (1.0 - f)[..., None])
    out.scatter_add_(2, hi[..., None], f[..., None])
    return out[..., 1:r + 1]


def paste_regions(boxes: torch.Tensor, out_hw: tuple[int, int], mask_size: int) -> torch.Tensor:
    """Integer [x0, y0, x1, y1) image regions (n, 4) outside of which a pasted mask is zero."""
    h, w = int(out_hw[0]), int(out_hw[1])
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    # u > -1  <=>  x + 0.5 > x0 - 0.5 * bw / R  (and symmetric at the far side)
    x0 = torch.floor(boxes[:, 0] - 0.5 * bw / mask_size - 0.5).clamp(0, w)
    y0 = torch.floor(boxes[:, 1] - 0.5 * bh / mask_size - 0.5).clamp(0, h)
    x1 = torch.ceil(boxes[:, 2] + 0.5 * bw / mask_size + 0.5).clamp(0, w)
    y1 = torch.ceil(boxes[:, 3] + 0.5 * bh / mask_size + 0.5).clamp(0, h)
    return torch.stack([x0, y0, x1, y1], 1).long()


_scratch = threading.local()


def _host_scratch(name: str, numel: int) -> torch.Tensor:
    """``numel`` float32 of this thread's scratch ``name`` (any content), reused from call to call so
    that large temporaries do not fault fresh pages in each time; kept up to :data:`SCRATCH_KEEP_BYTES`
    per name and thread, larger requests get fresh memory. Valid until the thread's next request."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(numel, dtype=torch.float32)
        if 4 * numel <= SCRATCH_KEEP_BYTES:
            setattr(_scratch, name, buf)
    return buf[:numel]


def _ragged_weights(coord0: torch.Tensor, size: torch.Tensor, starts: Sequence[int], lens: Sequence[int],
                    r: int) -> tuple[torch.Tensor, list[int]]:
    """The rows of :func:`_interp_weights` for every box at once: box ``i`` gets pixels
    ``starts[i] .. starts[i] + lens[i] - 1``; returns the (sum(lens), r) weights (box after box)
    and each box's first row. Same element-wise operations, hence the same values, as one
    :func:`_interp_weights` call per box, in a dozen tensor operations instead of a dozen per box."""
    device = coord0.device
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    counts = torch.tensor(list(lens), dtype=torch.long, device=device)
    box = torch.repeat_interleave(torch.arange(len(lens), device=device), counts, output_size=offsets[-1])
    shift = torch.tensor([s - o for s, o in zip(starts, offsets)], dtype=torch.long, device=device)
    pix = torch.arange(offsets[-1], device=device) + shift[box]
    u = (pix.to(coord0.dtype) + 0.5 - coord0[box]) / size.clamp(min=1e-6)[box] * r - 0.5
    u0 = torch.floor(u)
    f = u - u0
    u0 = u0.long()
    if device.type == "cpu" and u.dtype == torch.float32:  # zeroed reused memory: no page faults
        out = _host_scratch("weights", u.numel() * (r + 2)).view(-1, r + 2).zero_()
    else:
        out = torch.zeros((*u.shape, r + 2), dtype=u.dtype, device=device)
    out.scatter_(1, (u0 + 1).clamp(0, r + 1)[:, None], (1.0 - f)[:, None])
    out.scatter_add_(1, (u0 + 2).clamp(0, r + 1)[:, None], f[:, None])
    return out[:, 1:r + 1], offsets


def paste_one(probs: torch.Tensor, box: torch.Tensor, region: Sequence[int], threshold: float,
              wx: torch.Tensor | None = None, wy: torch.Tensor | None = None) -> torch.Tensor:
    """Bool crop (y1-y0, x1-x0) of one mask ``probs`` (R, R) at ``box`` (4,) over ``region``.
    ``wx`` (x1-x0, R) / ``wy`` (y1-y0, R): the box's interpolation weights when already made
    (:func:`_ragged_weights`); a region taller than the band limit is pasted in row bands."""
    x0, y0, x1, y1 = (int(v) for v in region)
    r = probs.shape[-1]
    device = probs.device
    if x1 <= x0 or y1 <= y0:
        return torch.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=torch.bool, device=device)
    b = box[None]
    p = probs[None]
    if wx is None:
        wx = _interp_weights(b[:, 0], b[:, 2] - b[:, 0], torch.arange(x0, x1, device=device), r)[0]
    wxt = wx[None].transpose(1, 2)
    band = max(1, BAND_PIXELS // (x1 - x0))
    if y1 - y0 <= band:
        if wy is None:
            wy = _interp_weights(b[:, 1], b[:, 3] - b[:, 1], torch.arange(y0, y1, device=device), r)[0]
        return (wy[None] @ p @ wxt)[0] >= threshold
    out = torch.empty((y1 - y0, x1 - x0), dtype=torch.bool, device=device)
    for s in range(y0, y1, band):  # rows of Wy @ mask @ Wx^T are independent
        e = min(y1, s + band)
        wyb = _interp_weights(b[:, 1], b[:, 3] - b[:, 1], torch.arange(s, e, device=device), r)
        torch.ge((wyb @ p @ wxt)[0], threshold, out=out[s - y0:e - y0])
    return out


def _box_weights(boxes: torch.Tensor, regions: Sequence[Sequence[int]],
                 r: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """:func:`_ragged_weights` of boxes (n, 4) over their regions, x and y in one call (the same
    element-wise values): every box's columns, then every box's rows. Returns the weights and the
    first row of each box's x weights (``ox``) and y weights (``oy``), n + 1 entries each."""
    n = len(regions)
    starts = [reg[0] for reg in regions] + [reg[1] for reg in regions]
    lens = [reg[2] - reg[0] for reg in regions] + [reg[3] - reg[1] for reg in regions]
    w, offsets = _ragged_weights(torch.cat([boxes[:, 0], boxes[:, 1]]),
                                 torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]]), starts, lens, r)
    return w, offsets[:n + 1], offsets[n:]


def _paste_host(probs: torch.Tensor, boxes: torch.Tensor, idx: Sequence[int], regions: Sequence[Sequence[int]],
                threshold: float, workers: int) -> tuple[list[torch.Tensor], list[int]]:
    """:func:`paste_one` on CPU for masks ``idx`` (non-empty single-band ``regions``) -> their bool
    crops and foreground counts. The boxes are shared among ``workers`` host threads by area; each
    makes its boxes' weights in one :func:`_box_weights` call and runs the same two ``bmm``
    products per box as the reference (into float32 scratch reused from box to box, each product at
    the start of it, aligned as fresh memory is), and NumPy compares with the threshold in float32
    straight into one bool buffer the crops are views of."""
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in regions]
    starts = [0]
    for hh, ww in sizes:
        starts.append(starts[-1] + hh * ww)
    out = torch.empty(starts[-1], dtype=torch.bool)
    out_np = out.numpy()
    thr = np.float32(threshold)  # torch compares a float32 tensor with a Python float in float32
    r = probs.shape[-1]
    areas = [0] * len(idx)

    probs_1 = probs.unsqueeze(1).unbind(0)  # (1, R, R) views of each mask, as probs[i][None]

    def paste_some(jobs: list[int]) -> None:
        b = boxes.index_select(0, torch.tensor([idx[j] for j in jobs], dtype=torch.long))
        w, ox, oy = _box_weights(b, [regions[j] for j in jobs], r)
        n = len(jobs)
        # every box's (1, h, R) y weights and (1, R, w) transposed x weights as views, in two calls
        lens = [ox[k + 1] - ox[k] for k in range(n)] + [oy[k + 1] - oy[k] for k in range(n)]
        wys = w[None].split(lens, dim=1)[n:]
        wxts = w[None].transpose(1, 2).split(lens, dim=2)[:n]
        scratch_t = _host_scratch("rows", max(sizes[j][0] for j in jobs) * r)
        scratch_v = _host_scratch("values", max(sizes[j][0] * sizes[j][1] for j in jobs))
        values = scratch_v.numpy()
        for k, j in enumerate(jobs):
            hh, ww = sizes[j]
            t = torch.bmm(wys[k], probs_1[idx[j]], out=scratch_t.as_strided((1, hh, r), (hh * r, r, 1)))
            torch.bmm(t, wxts[k], out=scratch_v.as_strided((1, hh, ww), (hh * ww, ww, 1)))
            crop = out_np[starts[j]:starts[j + 1]]
            np.greater_equal(values[:hh * ww], thr, out=crop)
            areas[j] = int(np.count_nonzero(crop))

    # greedy split by area, largest first, onto the least loaded worker (each keeps index order)
    parts: list[list[int]] = [[] for _ in range(max(1, min(workers, len(idx))))]
    load = [0] * len(parts)
    for j in sorted(range(len(idx)), key=lambda j: -sizes[j][0] * sizes[j][1]):
        k = load.index(min(load))
        parts[k].append(j)
        load[k] += sizes[j][0] * sizes[j][1]
    on_host_workers(paste_some, [sorted(p) for p in parts if p])
    crops = [out[starts[j]:starts[j + 1]].view(hh, ww) for j, (hh, ww) in enumerate(sizes)]
    return crops, areas


@dataclass
class PastedMasks:
    """Instance masks of one image, each kept as a bool crop of its paste region.

    ``regions[i] = (x0, y0, x1, y1)`` (host ints, exclusive ends); crop ``i`` is the mask on
    ``[y0:y1, x0:x1]``, the mask is False elsewhere. Built by :func:`paste_mask_crops` (or
    :meth:`from_dense`); :meth:`dense` materialises the (n, h, w) planes when a caller wants them.
    """

    regions: list[tuple[int, int, int, int]]
    image_size: tuple[int, int]
    probs: torch.Tensor | None = None  # (n, R, R) float32: crops not kept are pasted again
    boxes: torch.Tensor | None = None  # (n, 4) float32 output pixels
    threshold: float = 0.5
    crops: list[torch.Tensor | None] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    _areas: list[int] | None = None
    _area_t: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def crop(self, i: int) -> torch.Tensor:
        """Bool crop of mask ``i`` over its region."""
        c = self.crops[i]
        if c is not None:
            return c
        if self.probs is None or self.boxes is None:
            raise ConfigError("PastedMasks: crop not kept and no probabilities to paste it again")
        return paste_one(self.probs[i], self.boxes[i], self.regions[i], self.threshold)

    @property
    def areas(self) -> list[int]:
        """Foreground pixels per mask (computed once; reads the device)."""
        if self._areas is None:
            self._areas = self.area_tensor().tolist()
        return self._areas

    def area_tensor(self) -> torch.Tensor:
        """Foreground pixels per mask as an int64 (n,) tensor on the masks' device (no host read)."""
        if self._area_t is None:
            if self._areas is not None:
                self._area_t = torch.tensor(self._areas, dtype=torch.long, device=self.device)
            elif self.device.type == "cpu":  # NumPy counts: one thread, microsecond calls
                self._area_t = torch.tensor([int(np.count_nonzero(self.crop(i).numpy())) for i in range(len(self))],
                                            dtype=torch.long)
            else:
                sums = [self.crop(i).sum() for i in range(len(self))]
                self._area_t = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.long, device=self.device)
        return self._area_t

    def select(self, keep: Sequence[int]) -> PastedMasks:
        """The masks at indices ``keep`` (in that order)."""
        keep = [int(k) for k in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        return PastedMasks(
            regions=[self.regions[k] for k in keep], image_size=self.image_size,
            probs=None if self.probs is None else self.probs[idx],
            boxes=None if self.boxes is None else self.boxes[idx], threshold=self.threshold,
            crops=[self.crops[k] for k in keep], device=self.device,
            _areas=None if self._areas is None else [self._areas[k] for k in keep],
            _area_t=None if self._area_t is None else self._area_t[idx])

    def dense(self) -> torch.Tensor:
        """Bool (n, h, w): every mask as a full-image plane (n x h x w bytes)."""
        h, w = self.image_size
        out = torch.zeros((len(self), h, w), dtype=torch.bool, device=self.device)
        for i, (x0, y0, x1, y1) in enumerate(self.regions):
            if x1 > x0 and y1 > y0:
                out[i, y0:y1, x0:x1] = self.crop(i)
        return out

    def to(self, device: torch.device | str) -> PastedMasks:
        device = torch.device(device)
        return PastedMasks(
            regions=list(self.regions), image_size=self.image_size,
            probs=None if self.probs is None else self.probs.to(device),
            boxes=None if self.boxes is None else self.boxes.to(device), threshold=self.threshold,
            crops=[None if c is None else c.to(device) for c in self.crops], device=device, _areas=self._areas)

    @classmethod
    def from_dense(cls, masks: torch.Tensor, regions: torch.Tensor | None = None) -> PastedMasks:
        """Wrap bool (n, h, w) planes; ``regions`` (n, 4) must contain each mask (tight boxes when None)."""
        if masks.dim() != 3:
            raise ConfigError(f"masks must be (n,h,w), got {tuple(masks.shape)}")
        masks = masks.to(torch.bool)
        if regions is None:
            regions = tight_regions(masks)
        reg = [tuple(int(v) for v in r) for r in regions.tolist()]
        crops = [masks[i, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in enumerate(reg)]
        return cls(regions=reg, image_size=(int(masks.shape[1]), int(masks.shape[2])), crops=crops,
                   device=masks.device)


def tight_regions(masks: torch.Tensor) -> torch.Tensor:
    """Tight integer boxes [x0, y0, x1, y1) (exclusive end) of bool masks (n,h,w); empty -> 0s."""
    n, h, w = masks.shape
    rows = masks.any(dim=2)  # (n, h)
    cols = masks.any(dim=1)  # (n, w)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    if h == 0 or w == 0:
        return torch.zeros((n, 4), dtype=torch.long, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    reg = torch.stack([x0, y0, x1, y1], 1)
    return torch.where((x1 > x0)[:, None], reg, torch.zeros_like(reg))


def paste_mask_crops(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    budget_bytes: int = CROP_BUDGET_BYTES,
    regions: Sequence[Sequence[int]] | None = None,
) -> PastedMasks:
    """Paste ``mask_probs`` (n, R, R) at ``boxes`` (n, 4) xyxy (output pixels) into an ``out_hw``
    image -> :class:`PastedMasks` (one crop per box; boxes partly or fully outside are clipped).
    Crops are kept up to ``budget_bytes``; the others are pasted again when used. ``regions``:
    the :func:`paste_regions` of ``boxes`` as host ints when the caller already has them (else
    they are read from the device here)."""
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ConfigError(f"paste_masks: mask_probs must be (n,R,R), got {tuple(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4):
        raise ConfigError(f"paste_masks: boxes must be ({mask_probs.shape[0]},4), got {tuple(boxes.shape)}")
    h, w = int(out_hw[0]), int(out_hw[1])
    device = mask_probs.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    probs = mask_probs.float()
    if regions is None:
        regions = paste_regions(boxes, (h, w), mask_probs.shape[-1]).tolist()
    regions = [tuple(int(v) for v in r) for r in regions]
    crops: list[torch.Tensor | None] = []
    kept, used = [], 0
    for x0, y0, x1, y1 in regions:
        size = max(0, x1 - x0) * max(0, y1 - y0)
        kept.append(used + size <= budget_bytes)
        used += size if kept[-1] else 0
    workers = host_workers(device, sum(max(0, x1 - x0) * max(0, y1 - y0) for x0, y0, x1, y1 in regions),
                           HOST_SPLIT_PIXELS)
    areas: list[int] | None = None
    with one_intra_op_thread(device):  # small operations: see sepsnet.postprocess.threads
        # every kept, non-empty, single-band crop
        idx = [i for i, (x0, y0, x1, y1) in enumerate(regions)
               if kept[i] and x1 > x0 and 0 < y1 - y0 <= BAND_PIXELS // (x1 - x0)]
        got: dict[int, torch.Tensor] = {}
        if device.type == "cpu" and PASTE_ON_HOST and idx:
            pasted, areas = _paste_host(probs, boxes, idx, [regions[i] for i in idx], threshold, workers)
            got = dict(zip(idx, pasted))
        elif idx:  # interpolation weights of every kept, non-empty, single-band crop in one go
            wx, ox, oy = _box_weights(boxes.index_select(0, torch.tensor(idx, dtype=torch.long, device=device)),
                                      [regions[i] for i in idx], probs.shape[-1])
        slot = {i: j for j, i in enumerate(idx)}
        for i, reg in enumerate(regions):
            if not kept[i]:
                crops.append(None)
            elif i in got:
                crops.append(got[i])
            elif i in slot:
                j = slot[i]
                crops.append(paste_one(probs[i], boxes[i], reg, threshold, wx[ox[j]:ox[j + 1]], wx[oy[j]:oy[j + 1]]))
            else:
                crops.append(paste_one(probs[i], boxes[i], reg, threshold))
        if areas is not None:  # the host counted the masks it pasted; the others are empty or unknown
            by_index = dict(zip(idx, areas))
            areas = [by_index.get(i, 0 if x1 <= x0 or y1 <= y0 else None) for i, (x0, y0, x1, y1) in enumerate(regions)]
            if None in areas:
                areas = None
    return PastedMasks(regions=regions, image_size=(h, w), probs=probs, boxes=boxes, threshold=threshold,
                       crops=crops, device=device, _areas=areas)


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    return_regions: bool = False,
):
    """Full-image planes: bool (n, h, w) (``mask >= threshold``); with ``return_regions`` also the
    (n, 4) regions of :func:`paste_regions`. Prefer :func:`paste_mask_crops` (n x h x w bytes here)."""
    pasted = paste_mask_crops(mask_probs, boxes, out_hw, threshold, budget_bytes=0)
    out = pasted.dense()
    if return_regions:
        return out, torch.tensor(pasted.regions, dtype=torch.long, device=out.device).reshape(-1, 4)
    return out


def scale_boxes(boxes: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes in network-input (resized) pixels -> original image pixels (undo the resize)."""
    sy = float(original_hw[0]) / float(resized_hw[0])
    sx = float(original_hw[1]) / float(resized_hw[1])
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale
