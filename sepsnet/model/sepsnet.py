"""SE-PSNet (paper Sec. III, Fig. 1): backbone + FPN, stuff head, FCOS box head with
attention, basis head with the silhouette basis, blender (mask head), confidence head.

Training (``model.train(); model(images, targets)``) returns the weighted named losses of
docs/INTERFACES.md. As in BlendMask, the mask branch trains on FCOS positives (at most
``blender.max_train_instances`` per batch, sampled at random) with their *ground-truth* boxes
as RoIs. Inference is split in two export-friendly graphs: :meth:`SEPSNet.forward_dense`
(per image) and :meth:`SEPSNet.forward_instances` (per kept instance, n may be 0).
Train-only modules (``aux_module_names``) are never built with ``deploy=True`` and can be
removed from a trained model with :func:`strip_aux`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sepsnet.config import ModelConfig, validate_model
from sepsnet.model.backbone import BackboneFPN
from sepsnet.model.basis_head import BasisHead
from sepsnet.model.blender import Blender
from sepsnet.model.confidence_head import ConfidenceHead
from sepsnet.model.fcos_head import FCOSHead, Preselect, compute_locations, dense_predictions
from sepsnet.model.fcos_loss import FCOSLoss
from sepsnet.model.mask_losses import MaskAux, MaskLoss, mask_targets
from sepsnet.model.stuff_head import StuffHead

#: train-only submodules (dotted names); present only when built and not deploy
_AUX = ("stuff_head.silhouette", "basis_head.semantic", "mask_aux")


class SEPSNet(nn.Module):
    """The full network; see the module docstring and docs/INTERFACES.md."""

    def __init__(self, cfg: ModelConfig, deploy: bool = False, load_pretrained: bool = False) -> None:
        """Every part, the losses included, is built from the (validated) config here, in one place; the
        parts themselves take explicit arguments (``from_config`` maps the config keys to them)."""
        super().__init__()
        validate_model(cfg, "model config", training=load_pretrained)
        self.cfg = cfg
        self.deploy = deploy
        self.backbone = BackboneFPN.from_config(cfg, load_pretrained)
        self.fcos_head = FCOSHead.from_config(cfg)
        self.stuff_head = StuffHead.from_config(cfg, deploy)
        self.basis_head = BasisHead.from_config(cfg, deploy)
        self.blender = Blender.from_config(cfg)
        self.mask_aux: nn.Module | None = MaskAux() if cfg.components.mask_aux and not deploy else None
        self.confidence_head: ConfidenceHead | None = (
            ConfidenceHead.from_config(cfg) if cfg.components.mask_score else None)
        self.strides = list(cfg.fcos.strides)
        # losses and the mask-branch sampling (train only; plain values, no parameters)
        self.fcos_loss = FCOSLoss.from_config(cfg)
        self.mask_loss = MaskLoss.from_config(cfg)
        self.max_train_instances = int(cfg.blender.max_train_instances)
        self.mask_size = int(cfg.blender.mask_size)

    # ------------------------------------------------------------------ helpers
    def aux_module_names(self) -> list[str]:
        """Dotted names of the train-only submodules this model holds."""
        mods = dict(self.named_modules())
        return [n for n in _AUX if mods.get(n) is not None]

    def _features(self, images: Tensor) -> dict[str, Tensor]:
        return self.backbone(images)

    # ---------------------------------------------------------------- inference
    def forward_dense(self, images: Tensor, preselect: Preselect | None = None) -> dict[str, Tensor]:
        """images (N,3,H,W) -> boxes, scores, centerness, attention, bases, p3, stuff_logits;
        per-location outputs for every location, or for the top-k per level with ``preselect``."""
        f = self._features(images)
        levels = [f["p3"], f["p4"], f["p5"], f["p6"], f["p7"]]
        head = self.fcos_head(levels)
        out = dense_predictions(head, compute_locations(levels, self.strides), preselect)
        bases, _ = self.basis_head([f["p3"], f["p4"], f["p5"]], f["p2"], aux=False)
        stuff_logits, _ = self.stuff_head([f["p2"], f["p3"], f["p4"], f["p5"]], aux=False)
        out.update(bases=bases, p3=f["p3"], stuff_logits=stuff_logits)
        return out

    def forward_instances(self, bases: Tensor, p3: Tensor, rois: Tensor,
                          attention: Tensor) -> dict[str, Tensor]:
        """bases, p3 from forward_dense; rois (n,5); attention (n,K*M*M) -> mask_probs (n,R,R)
        and, with the confidence head, iou_score (n,) and silhouette_score (n,)."""
        probs = torch.sigmoid(self.blender(bases, rois, attention))
        out = {"mask_probs": probs}
        if self.confidence_head is not None:
            iou, sil = ConfidenceHead.scores(self.confidence_head(p3, bases, rois, probs))
            out.update(iou_score=iou, silhouette_score=sil)
        return out

    # ----------------------------------------------------------------- training
    def forward(self, images: Tensor, targets: list[dict] | None = None):
        """Train mode: weighted losses dict (needs targets); eval mode: forward_dense(images)."""
        if not self.training:
            return self.forward_dense(images)
        if targets is None:
            raise ValueError("SEPSNet in train mode needs targets; call model.eval() for inference")
        return self._losses(images, targets)

    def _losses(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        f = self._features(images)
        levels = [f["p3"], f["p4"], f["p5"], f["p6"], f["p7"]]
        head = self.fcos_head(levels)
        losses, pos = self.fcos_loss(head, compute_locations(levels, self.strides), targets)

        stuff_logits, stuff_sil = self.stuff_head([f["p2"], f["p3"], f["p4"], f["p5"]])
        stuff = torch.stack([t["stuff"].to(images.device, torch.int64) for t in targets])
        losses.update(self.stuff_head.losses(stuff_logits, stuff_sil, stuff))

        bases, sem = self.basis_head([f["p3"], f["p4"], f["p5"]], f["p2"])
        losses.update(self.basis_head.losses(bases, sem, targets))

        # ---- mask branch on sampled positives, ground-truth boxes as RoIs (BlendMask)
        n_pos = pos["batch_index"].shape[0]
        keep = torch.arange(n_pos, device=images.device)
        limit = self.max_train_instances
        if n_pos > limit:
            keep = torch.randperm(n_pos, device=images.device)[:limit]
        b_idx, g_idx = pos["batch_index"][keep], pos["gt_index"][keep]
        counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], device=images.device)
        offsets = torch.cumsum(counts, 0) - counts
        row = offsets[b_idx] + g_idx  # row in the stacked ground truth
        gt_boxes = torch.cat([t["boxes"].to(images.device, torch.float32) for t in targets])
        box = gt_boxes[row] if row.numel() else gt_boxes.new_zeros((0, 4))
        rois = torch.cat([b_idx.to(box.dtype)[:, None], box], dim=1)
        logits = self.blender(bases, rois, pos["attention"][keep])
        with torch.no_grad():  # crop only the masks in use (a full-res float copy is large)
            uniq, inv = torch.unique(row, return_inverse=True)
            gt_masks = torch.cat([t["masks"].to(images.device) for t in targets])[uniq]
            tgt = mask_targets(gt_masks, torch.cat([inv.to(box.dtype)[:, None], box], 1),
                               self.mask_size)
        aux = self.mask_aux(logits) if self.mask_aux is not None else None
        weights = pos["centerness_target"][keep]
        losses.update(self.mask_loss(logits, tgt, weights, aux))

        if self.confidence_head is not None:
            probs = torch.sigmoid(logits).detach()
            raw = self.confidence_head(f["p3"].detach(), bases.detach(), rois, probs)
            losses["loss_confidence"] = self.confidence_head.loss(
                raw, ConfidenceHead.targets(probs, tgt))
        return losses



def strip_aux(model: SEPSNet) -> list[str]:
    """Remove every train-only submodule of ``model`` in place; returns the removed names."""
    names = model.aux_module_names()
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, None)
    model.deploy = True
    return names
