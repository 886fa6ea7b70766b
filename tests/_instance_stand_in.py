"""A stand-in instance engine for post-processing tests: its outputs for a roi depend on that roi alone
(as a real engine's do), so running it on fewer rois, or on a padded batch, gives the same values to
every roi. Pure tensor work on the rois' device (no host data), so host-read counts stay the
post-processing's own."""
from __future__ import annotations

from collections.abc import Callable

import torch


def per_roi_instances(mask_size: int, with_scores: bool = True) -> Callable[..., dict[str, torch.Tensor]]:
    """``run(bases, p3, rois, attention)`` -> mask_probs (n, mask_size, mask_size) [+ iou/silhouette scores]."""
    def run(bases, p3, rois, attention):
        key = rois[:, 1] * 0.013 + rois[:, 2] * 0.029 + rois[:, 3] * 0.017 + rois[:, 4] * 0.031
        grid = torch.linspace(-1, 1, mask_size, device=rois.device)
        blob = 1 - (grid[None, :, None] ** 2 + grid[None, None, :] ** 2) * (1.2 + key.frac()[:, None, None])
        out = {"mask_probs": torch.sigmoid(blob * 6)}
        if with_scores:
            out["iou_score"] = torch.sigmoid(torch.sin(key * 7.0) * 3)
            out["silhouette_score"] = torch.sigmoid(torch.cos(key * 5.0) * 3)
        return out
    return run
