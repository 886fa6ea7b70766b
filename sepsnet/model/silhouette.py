"""Silhouette features and the silhouette (Dice) loss (paper Sec. III-B, Eq. 1-2, Fig. 2).

The silhouette of a label map is where the 8-neighbour Laplacian
``[-1,-1,-1; -1,8,-1; -1,-1,-1]`` is non-zero. Padding is *replicate*, so the image
border is never an edge.

For an id map with more than two ids the Laplacian of the raw ids can cancel (ids 1 and 3
around a 2 sum to 8*2), so :func:`id_edges` binarises the Laplacian of every segment's
indicator and takes the union. For a 0/1 indicator ``|lap| > 0`` holds exactly where a
neighbour differs, so the union is "some 8-neighbour has a different id"; that is what we
compute, with eight shifted comparisons instead of one conv per segment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def laplacian(x: Tensor) -> Tensor:
    """8-neighbour Laplacian of (N,C,H,W) float maps, per channel, replicate padding."""
    c = x.shape[1]
    k = -torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 8.0
    weight = k.expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)


def id_edges(ids: Tensor) -> Tensor:
    """Binary silhouette of an integer id map (..., H, W): 1 where any 8-neighbour differs.

    Equals the union over segments of ``|laplacian(segment indicator)| > 0`` (module doc);
    returns float32 of the same shape.
    """
    shape = ids.shape
    x = ids.reshape(-1, 1, shape[-2], shape[-1]).to(torch.int64)
    # replicate padding without float round-off: index clamping
    h, w = shape[-2], shape[-1]
    ys = torch.arange(-1, h + 1, device=ids.device).clamp(0, h - 1)
    xs = torch.arange(-1, w + 1, device=ids.device).clamp(0, w - 1)
    pad = x[:, :, ys][:, :, :, xs]
    edge = torch.zeros_like(x, dtype=torch.bool)
    for dy, dx in _OFFSETS:
        edge |= pad[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != x
    return edge.to(torch.float32).reshape(shape)


def ignore_valid(ignore: Tensor) -> Tensor:
    """Valid-pixel weights for a silhouette: 0 where the pixel or a neighbour is ignored."""
    shape = ignore.shape
    x = ignore.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    near = F.max_pool2d(x, 3, stride=1, padding=1)
    return (1.0 - near).reshape(shape)


def resize_ids(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an integer map (..., H, W) to ``size`` (keeps ids exact)."""
    h, w = ids.shape[-2], ids.shape[-1]
    if (h, w) == tuple(size):
        return ids
    ys = (torch.arange(size[0], device=ids.device, dtype=torch.float64) + 0.5) * (h / size[0])
    xs = (torch.arange(size[1], device=ids.device, dtype=torch.float64) + 0.5) * (w / size[1])
    ys = ys.floor().long().clamp(0, h - 1)
    xs = xs.floor().long().clamp(0, w - 1)
    return ids[..., ys, :][..., xs]


def instance_id_map(masks: Tensor) -> Tensor:
    """(G,H,W) masks -> (H,W) int64 ids: 0 background, g+1 for mask g (later masks win)."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.int64, device=masks.device)
    for g in range(masks.shape[0]):  # one (H,W) map at a time: no (G,H,W) int64 temporary
        out.masked_fill_(masks[g].to(torch.bool), g + 1)
    return out


def things_silhouette(masks: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Silhouette of things (Fig. 2c) from instance masks (G,H,W) -> float (h,w)."""
    ids = instance_id_map(masks)
    return id_edges(resize_ids(ids, size) if size else ids)


def stuff_silhouette(stuff: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Silhouette of the stuff map (Fig. 2d; classes 0..S, 255 ignore) -> (edges, valid).

    Ignored pixels and their neighbours get valid = 0 (their edges are unknown)."""
    ids = resize_ids(stuff, size) if size else stuff
    return id_edges(ids), ignore_valid(ids == IGNORE)


def panoptic_silhouette(masks: Tensor, stuff: Tensor,
                        size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Full panoptic silhouette (things and stuff together) -> (edges, valid), float (h,w).

    Each thing instance is its own segment, stuff pixels keep their class; pixels ignored in
    ``stuff`` and not covered by a mask (void, crowd, padding) are ignored."""
    inst = instance_id_map(masks)
    pan = torch.where(inst > 0, inst + 1024, stuff.to(torch.int64))
    ignore = (inst == 0) & (stuff == IGNORE)
    if size:
        pan, ignore = resize_ids(pan, size), resize_ids(ignore, size)
    return id_edges(pan), ignore_valid(ignore)


def dice_score(p: Tensor, g: Tensor, valid: Tensor | None = None, eps: float = 1.0) -> Tensor:
    """Eq. 1 per sample: (2 sum pg + eps) / (sum p^2 + sum g^2 + eps); dims after 0 reduced."""
    p, g = p.float(), g.float()  # fp32 sums: an fp16 sum over a 1/4-scale map can overflow
    if valid is not None:
        p, g = p * valid, g * valid
    p, g = p.flatten(1), g.flatten(1)
    return (2.0 * (p * g).sum(1) + eps) / ((p * p).sum(1) + (g * g).sum(1) + eps)


def dice_loss(p: Tensor, g: Tensor, valid: Tensor | None = None, eps: float = 1.0) -> Tensor:
    """Eq. 2: mean over samples of 1 - Score; 0 (with a graph) for an empty batch."""
    if p.shape[0] == 0:
        return p.sum() * 0.0
    return (1.0 - dice_score(p, g, valid, eps)).mean()


def mask_silhouette(mask: Tensor) -> Tensor:
    """Binarised Laplacian of binary masks (N,H,W): ``laplacian > 0``, i.e. the mask pixels
    with a neighbour outside the mask (the inner boundary ring); float (N,H,W)."""
    return (laplacian(mask[:, None].to(torch.float32)) > 0)[:, 0].to(torch.float32)


def soft_silhouette(prob: Tensor) -> Tensor:
    """Predicted silhouette of probability maps (N,1,H,W): the Laplacian clamped to [0, 1]
    (positive on the inner side of an edge, matching :func:`mask_silhouette`)."""
    return laplacian(prob).clamp(0.0, 1.0)
