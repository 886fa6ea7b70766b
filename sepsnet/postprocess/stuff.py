"""Stuff labels at the original resolution (DESIGN "Inference split", step 4).

The stuff logits (1/4 of the padded input) are cropped to the valid (resized, unpadded) cells
and sampled bilinearly at original pixel centres (half-pixel rule, border clamp), then the
argmax over classes is taken. Up to ``_INTERP_BYTES`` of resized logits this is one
channels-last ``F.interpolate``; beyond it a ``grid_sample`` over row bands (bounded memory).
Labels are returned in the smallest integer type that holds the classes (uint8 for <= 256),
so a very large frame costs one byte per pixel here.
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
        up = F.interpolate(x, scale_factor=(stride * oh / rh, stride * ow / rw), mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)
        # argmax over the contiguous channel axis of the channels-last result (same values, same
        # first-maximum rule as ``up[0, :, :oh, :ow].argmax(0)``, about twice as fast)
        return up[0].permute(1, 2, 0)[:oh, :ow].argmax(-1).to(dtype)
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
