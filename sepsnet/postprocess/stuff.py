"""Stuff labels at the original resolution (DESIGN "Inference split", step 4).

The stuff logits (1/4 of the padded input) are cropped to the valid (resized, unpadded) cells
and sampled bilinearly at original pixel centres (half-pixel rule, border clamp), then the
argmax over classes is taken. Up to ``_INTERP_BYTES`` of resized logits this is one
channels-last ``F.interpolate``; beyond it a ``grid_sample`` over row bands (bounded memory).
Labels are returned in the smallest integer type that holds the classes (uint8 for <= 256),
so a very large frame costs one byte per pixel here.

ATen's channels-last bilinear kernel runs one thread per batch item, so with several intra-op
threads the map is resampled as a batch of row tiles (:func:`_row_tiles`), each tile an input
row range whose output rows get exactly the source indices and weights of the full call
(checked with :func:`source_taps`, the kernel's index arithmetic): the same kernel then does the
same arithmetic on the same values, and the labels are identical. When no such split exists
(e.g. a scale that is not a power of two) the single call is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BAND_BYTES = 128 << 20  # float32 scratch per band of resized stuff logits (large maps)
_INTERP_BYTES = 768 << 20  # up to this, resize all stuff logits in one F.interpolate
STUFF_STRIDE = 4


def stuff_label_map(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                    stride: int = STUFF_STRIDE) -> torch.Tensor:
    """Argmax of ``stuff_logits`` (C, hs, ws) (stride ``stride`` w.r.t. the padded input),
    cropped to the valid region and resampled ``resized_hw`` -> ``original_hw``: (oh, ow) labels,
    uint8 when C <= 256 (int64 otherwise)."""
    (rh, rw), (oh, ow) = resized_hw, original_hw
    # crop to the valid cells (a partly valid last cell is kept); border clamp happens there
    logits = stuff_logits[:, : math.ceil(rh / stride), : math.ceil(rw / stride)].float()[None]
    c, hs, ws = logits.shape[1:]
    dev = stuff_logits.device
    dtype = torch.uint8 if c <= 256 else torch.int64
    if c * oh * ow * 4 <= _INTERP_BYTES:
        # one channels-last F.interpolate with the exact scale (same mapping as the grid below);
        # a replicated extra cell makes the output cover (oh, ow) whatever rounding
        x = F.pad(logits, (0, 1, 0, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
        sf = (stride * oh / rh, stride * ow / rw)
        tiles = _row_tiles(x.shape[2], oh, sf[0], _intra_op_threads()) if dev.type == "cpu" else None
        if tiles is not None:
            n = tiles[0][2]
            batch = torch.cat([x[:, :, s:s + n] for _, s, _, _ in tiles]).contiguous(memory_format=torch.channels_last)
            up = F.interpolate(batch, scale_factor=sf, mode="bilinear", align_corners=False,
                               recompute_scale_factor=False).permute(0, 2, 3, 1)
            labels = torch.empty((oh, ow), dtype=dtype, device=dev)
            for b, (y0, _, _, k0) in enumerate(tiles):
                y1 = tiles[b + 1][0] if b + 1 < len(tiles) else oh
                labels[y0:y1] = up[b, k0:k0 + y1 - y0, :ow].max(-1).indices.to(dtype)
            return labels
        up = F.interpolate(x, scale_factor=sf, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        # index of the maximum over the contiguous channel axis of the channels-last result (same
        # values, same first-maximum rule as ``up[0, :, :oh, :ow].argmax(0)``; ``max`` is faster
        # than ``argmax`` there, both about twice as fast as over the strided axis)
        return up[0].permute(1, 2, 0)[:oh, :ow].max(-1).indices.to(dtype)
    # logit-map coordinate u of original pixel y: u = (y + 0.5) * (rh / oh) / stride - 0.5
    gx = (torch.arange(ow, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rw / (ow * stride * ws)) - 1.0
    gy_all = (torch.arange(oh, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rh / (oh * stride * hs)) - 1.0
    labels = torch.empty((oh, ow), dtype=dtype, device=dev)
    band = max(1, _BAND_BYTES // max(1, 4 * ow * (c + 2)))
    for y0 in range(0, oh, band):
        gy = gy_all[y0:y0 + band]
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        vals = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[y0:y0 + band] = vals[0].argmax(0).to(dtype)
    return labels


def stuff_labels_at(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                    stride: int = STUFF_STRIDE) -> torch.Tensor:
    """:func:`stuff_label_map` as int64 (oh, ow)."""
    return stuff_label_map(stuff_logits, resized_hw, original_hw, stride).long()


def _intra_op_threads() -> int:
    return torch.get_num_threads()


def source_taps(out_n: int, in_n: int, sf: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index of ``F.interpolate(scale_factor=sf, mode="bilinear", align_corners=False,
    recompute_scale_factor=False)`` along one axis: the two source indices and the weight of the
    second, as ATen's CPU kernel computes them (float32 scale ``1/sf``, half-pixel source index in
    double rounded to float32, clamped at 0, floor guarded to the last cell; a same-size axis is
    copied)."""
    if out_n == in_n:
        i0 = torch.arange(out_n)
        return i0, i0.clone(), torch.zeros(out_n, dtype=torch.float32)
    scale = float(torch.tensor(1.0 / sf, dtype=torch.float32))
    src = (scale * (torch.arange(out_n, dtype=torch.float64) + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.floor().long().clamp(max=in_n - 1)
    lam = (src - i0.float()).clamp(0, 1)
    return i0, i0 + (i0 < in_n - 1).long(), lam


def _row_tiles(in_h: int, oh: int, sf: float, parts: int) -> list[tuple[int, int, int, int]] | None:
    """Split the ``oh`` output rows of a resample of ``in_h`` input rows into ``parts`` tiles of one
    common input height: per tile ``(first output row, first input row, input rows, row of the
    first output row in the tile's own output)``, such that every output row gets the same source
    rows (shifted) and weight as in the full call (:func:`source_taps`); None when no exact split
    is found or splitting is not worth it."""
    if parts < 2 or oh < 64 * parts:
        return None
    full_out = int(math.floor(float(in_h) * sf))
    f0, f1, fl = source_taps(full_out, in_h, sf)
    firsts = [oh * p // parts for p in range(parts)]
    ends = firsts[1:] + [oh]
    # one input height for all tiles, enough for each tile's source rows plus one; the last tile
    # reaches the bottom border (same clamping there)
    n = max(in_h - max(0, int(f0[firsts[-1]]) - 1),
            *(int(f1[e - 1]) + 2 - max(0, int(f0[y0]) - 1) for y0, e in zip(firsts, ends)))
    if n >= in_h:
        return None
    tiles = [(y0, min(max(0, int(f0[y0]) - 1), in_h - n), n, 0) for y0 in firsts]
    out_n = int(math.floor(float(n) * sf))
    t0, t1, tl = source_taps(out_n, n, sf)
    checked = []
    for p, (y0, start, _, _) in enumerate(tiles):
        y1 = tiles[p + 1][0] if p + 1 < len(tiles) else oh
        found = None
        for k0 in range(max(0, int(round(y0 - start * sf)) - 3), int(round(y0 - start * sf)) + 4):
            k1 = k0 + y1 - y0
            if k0 < 0 or k1 > out_n:
                continue
            if (torch.equal(t0[k0:k1] + start, f0[y0:y1]) and torch.equal(t1[k0:k1] + start, f1[y0:y1])
                    and torch.equal(tl[k0:k1], fl[y0:y1])):
                found = k0
                break
        if found is None:
            return None
        checked.append((y0, start, n, found))
    return checked
