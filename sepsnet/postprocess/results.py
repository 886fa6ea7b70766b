"""Result container returned by :func:`sepsnet.postprocess.pipeline.panoptic_inference`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sepsnet.postprocess.paste import PastedMasks


@dataclass
class PanopticResult:
    """Panoptic output of one image, at the ORIGINAL image resolution.

    ``id_map``: int32 (h, w), 0 = void, k = ``segments_info[i]["id"]``.
    ``segments_info``: list of dicts ``id, category_id`` (contiguous: things 0..T-1,
    stuff 0..S-1), ``isthing``, ``score`` (mask score for things, 1.0 for stuff),
    ``area`` (pixels), ``bbox`` ([x, y, w, h] in pixels).
    The ``instance_*`` fields hold every instance kept after NMS and silhouette dedup
    (before fusion; used e.g. for instance AP); boxes are xyxy in original pixels.
    ``masks``: those instances' masks as crops per box (:class:`PastedMasks`) or None when not
    requested; ``instance_masks`` materialises them as bool (n, h, w) planes on access.
    ``timings``: seconds per stage when timing was asked for (batch stages are shared).
    """

    id_map: torch.Tensor
    segments_info: list[dict[str, Any]]
    image_size: tuple[int, int]
    instance_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    instance_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    instance_classes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    masks: PastedMasks | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        return int(self.instance_scores.numel())

    @property
    def instance_masks(self) -> torch.Tensor | None:
        """Bool (n, h, w) planes of the instance masks (made now: n x h x w bytes), or None."""
        return None if self.masks is None else self.masks.dense()

    def to(self, device: torch.device | str) -> PanopticResult:
        """Copy the tensors to ``device`` (e.g. ``"cpu"`` before writing)."""
        masks = None if self.masks is None else self.masks.to(device)
        return PanopticResult(
            self.id_map.to(device), self.segments_info, self.image_size,
            self.instance_boxes.to(device), self.instance_scores.to(device),
            self.instance_classes.to(device), masks, dict(self.timings),
        )
