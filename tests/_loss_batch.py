"""A deterministic toy batch and small SE-PSNet configs for the loss-equivalence test.

``tests/fixtures/losses_before_from_config.json`` holds the losses the code computed on this batch
*before* the losses took explicit arguments (generated with the sepsnet package of commit dfbbc23:
``git archive dfbbc23 sepsnet | tar -x -C OLD; PYTHONPATH=OLD python tests/_loss_batch.py
tests/fixtures/losses_before_from_config.json``);
``tests/test_loss_plumbing.py`` recomputes them with the current code. Every loss weight and FCOS
loss/target setting differs from its default so a plumbing slip changes a number.
"""
from __future__ import annotations

import json
import sys

import torch

from sepsnet.config import (
    BackboneConfig,
    BlenderConfig,
    ComponentsConfig,
    FCOSConfig,
    HeadsConfig,
    LossWeightsConfig,
    ModelConfig,
)

#: component switches of the three cases: everything, the baseline, mask aux without the mask loss
CASES: dict[str, dict[str, bool]] = {
    "all": {},
    "baseline": dict(mask_loss=False, mask_score=False, silhouette_feature=False, mask_aux=False,
                     silhouette_stuff=False),
    "aux_only": dict(mask_loss=False, mask_aux=True),
}


def case_config(case: str) -> ModelConfig:
    """A ResNet-18 model with narrow heads and non-default loss settings."""
    weights = LossWeightsConfig(fcos_cls=1.1, fcos_box=0.9, fcos_ctr=1.3, mask_bce=0.8, mask_iou=1.2,
                                mask_aux=0.4, stuff=0.7, stuff_silhouette=1.5, basis_silhouette=0.6,
                                basis_aux_semantic=1.4, confidence=0.5)
    return ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=0), fpn_channels=16,
                       num_thing_classes=3, num_stuff_classes=2,
                       fcos=FCOSConfig(num_convs=1, sizes_of_interest=[32, 64, 128, 256], center_sample_radius=2.0,
                                       focal_alpha=0.3, focal_gamma=1.5),
                       blender=BlenderConfig(max_train_instances=10, mask_size=28),
                       heads=HeadsConfig(stuff_channels=16, basis_channels=16, basis_num_convs=1),
                       components=ComponentsConfig(**CASES[case]), loss_weights=weights)


def toy_batch(n: int = 2, size: int = 96, g: int = 3, seed: int = 0, border: int = 28,
              radius: tuple[float, float] = (8.0, 20.0)) -> tuple[torch.Tensor, list[dict]]:
    """Images with elliptic instances over a two-class stuff background (INTERFACES targets): centres
    at least ``border`` pixels inside, radii ``radius[0] + U(0, radius[1])``."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = torch.randn(n, 3, size, size, generator=gen) * 0.1, []
    for b in range(n):
        masks, boxes = torch.zeros(g, size, size, dtype=torch.uint8), []
        for i in range(g):
            cx, cy = (torch.rand(2, generator=gen) * (size - 2 * border) + border).tolist()
            rx, ry = (torch.rand(2, generator=gen) * radius[1] + radius[0]).tolist()
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            masks[i] = m.to(torch.uint8)
            ys, xs = m.nonzero(as_tuple=True)
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            images[b, i % 3][m] += 1.0
        stuff = torch.zeros(size, size, dtype=torch.int64)
        stuff[size // 2:] = 1
        stuff[masks.bool().any(0)] = 2
        stuff[:, -4:] = 255
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), classes=torch.arange(g) % 3,
                            masks=masks, stuff=stuff, image_id=b))
    return images, targets


def case_losses(case: str) -> dict[str, float]:
    """Every weighted loss of one train step of a seeded model on the toy batch, and the gradient norm."""
    from sepsnet.model.sepsnet import SEPSNet

    torch.manual_seed(0)
    model = SEPSNet(case_config(case)).train()
    images, targets = toy_batch()
    torch.manual_seed(1)  # the positives sampled for the mask branch
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["grad_norm"] = float(grad)
    return out


if __name__ == "__main__":
    values = {case: case_losses(case) for case in CASES}
    with open(sys.argv[1], "w", encoding="utf-8") as fh:
        json.dump(values, fh, indent=1, sort_keys=True)
        fh.write("\n")
