"""Paste R x R mask probabilities into the image at their boxes (DESIGN "Inference split", step 4).

Geometry (same as detectron2's ``paste_masks_in_image`` / ``grid_sample(align_corners=False)``
over the box): the R x R mask covers the continuous box [x0, x1] x [y0, y1]; image pixel
(y, x) has its centre at (y + 0.5, x + 0.5) and samples the mask at continuous mask coordinate
``u = (x + 0.5 - x0) / (x1 - x0) * R - 0.5`` (mask pixel centres at integers), bilinearly,
with zeros outside the mask. A pixel is foreground when the sampled probability is
``>= threshold``. Bilinear sampling is separable, so each mask is pasted as
``Wy @ mask @ Wx^T`` with (H, R) and (W, R) interpolation matrices: exact, batched and free of
per-pixel Python loops. Work is restricted to the pixels a mask can reach (its box grown by
half a mask pixel, clipped to the image); instances are processed in chunks so memory is
bounded (one instance per chunk on CPU, a memory budget on CUDA).
"""
from __future__ import annotations

import torch

from sepsnet.errors import ConfigError

_CUDA_CHUNK_BYTES = 1 << 30  # float32 scratch per chunk on CUDA


def _interp_weights(coord0: torch.Tensor, size: torch.Tensor, pix: torch.Tensor, r: int) -> torch.Tensor:
    """(n, P, r) bilinear weights of pixels ``pix`` (P,) for boxes starting at ``coord0`` with
    extent ``size`` (n,), zero padding outside the r mask cells."""
    u = (pix[None, :].to(coord0.dtype) + 0.5 - coord0[:, None]) / size.clamp(min=1e-6)[:, None] * r - 0.5  # (n, P)
    u0 = torch.floor(u)
    f = (u - u0)[..., None]
    u0 = u0.long()[..., None]
    cells = torch.arange(r, device=u.device)
    return (1.0 - f) * (cells == u0) + f * (cells == u0 + 1)


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


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    chunk_size: int | None = None,
    return_regions: bool = False,
):
    """Paste ``mask_probs`` (n, R, R) at ``boxes`` (n, 4) xyxy (output pixels) into an
    ``out_hw`` image -> bool (n, h, w) (``mask >= threshold``); with ``return_regions`` also the
    (n, 4) regions of :func:`paste_regions`. Boxes partly or fully outside are clipped."""
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ConfigError(f"paste_masks: mask_probs must be (n,R,R), got {tuple(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4):
        raise ConfigError(f"paste_masks: boxes must be ({mask_probs.shape[0]},4), got {tuple(boxes.shape)}")
    n, r = mask_probs.shape[0], mask_probs.shape[1]
    h, w = int(out_hw[0]), int(out_hw[1])
    device = mask_probs.device
    out = torch.zeros((n, h, w), dtype=torch.bool, device=device)
    boxes = boxes.to(device=device, dtype=torch.float32)
    regions = paste_regions(boxes, (h, w), r)
    if n == 0 or h == 0 or w == 0:
        return (out, regions) if return_regions else out
    probs = mask_probs.float()
    if chunk_size is None:
        chunk_size = 1 if device.type == "cpu" else max(1, _CUDA_CHUNK_BYTES // (4 * h * w))
    reg_list = regions.tolist()
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        x0 = min(reg[0] for reg in reg_list[s:e])
        y0 = min(reg[1] for reg in reg_list[s:e])
        x1 = max(reg[2] for reg in reg_list[s:e])
        y1 = max(reg[3] for reg in reg_list[s:e])
        if x1 <= x0 or y1 <= y0:
            continue
        b = boxes[s:e]
        wy = _interp_weights(b[:, 1], b[:, 3] - b[:, 1], torch.arange(y0, y1, device=device), r)
        wx = _interp_weights(b[:, 0], b[:, 2] - b[:, 0], torch.arange(x0, x1, device=device), r)
        vals = wy @ probs[s:e] @ wx.transpose(1, 2)  # (c, y1-y0, x1-x0)
        out[s:e, y0:y1, x0:x1] = vals >= threshold
    return (out, regions) if return_regions else out


def scale_boxes(boxes: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes in network-input (resized) pixels -> original image pixels (undo the resize)."""
    sy = float(original_hw[0]) / float(resized_hw[0])
    sx = float(original_hw[1]) / float(resized_hw[1])
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale

