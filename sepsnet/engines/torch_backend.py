"""Eager PyTorch backend: the deploy-mode model (no aux branches) behind the Backend protocol."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from sepsnet.engines.backend import TensorSpec

DENSE_OUTPUTS = ("boxes", "scores", "centerness", "attention", "bases", "p3", "stuff_logits")


class TorchBackend:
    """``part="dense"``: image -> dense outputs; ``part="instance"``: bases, p3, rois, attention ->
    mask_probs (+ iou_score, silhouette_score)."""

    #: forward passes in inference mode change no module state, so threads may call ``run`` together
    thread_safe = True

    def __init__(self, model: torch.nn.Module, part: str, device: torch.device | str = "cpu") -> None:
        if part not in ("dense", "instance"):
            raise ValueError(f"part must be dense or instance, got {part!r}")
        self.model = model.eval().to(device)
        self.part = part
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        if self.part == "dense":
            return [TensorSpec("image", ("batch", 3, "height", "width"))]
        return [TensorSpec("bases", ("batch", "bases", "h4", "w4")),
                TensorSpec("p3", ("batch", "channels", "h8", "w8")),
                TensorSpec("rois", ("instances", 5)), TensorSpec("attention", ("instances", "attn"))]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        if self.part == "dense":
            return [TensorSpec(n, ()) for n in DENSE_OUTPUTS]
        return [TensorSpec(n, ("instances",)) for n in ("mask_probs", "iou_score", "silhouette_score")]

    @torch.inference_mode()
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.part == "dense":
            return dict(self.model.forward_dense(feeds["image"].to(self.device)))
        names = ("bases", "p3", "rois", "attention")
        return dict(self.model.forward_instances(*(feeds[k].to(self.device) for k in names)))
