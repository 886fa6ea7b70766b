"""Config plumbing: the losses take explicit arguments built by ``from_config`` and training numbers did not
change; config validation reads the one backbone registry.

``tests/fixtures/losses_before_from_config.json`` was computed on the toy batch of ``tests/_loss_batch.py``
by the code before this change (losses reading the whole ModelConfig); the same seeded model and batch
must give the same losses and gradient norm now."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sepsnet.model.fcos_loss import FCOSLoss
from sepsnet.model.mask_losses import MaskLoss
from sepsnet.model.sepsnet import SEPSNet

from _loss_batch import CASES, case_config, case_losses

BEFORE = json.loads((Path(__file__).parent / "fixtures" / "losses_before_from_config.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_equal_the_code_before_the_change(case):
    now, before = case_losses(case), BEFORE[case]
    assert set(now) == set(before)
    for key, value in before.items():
        assert now[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_from_config_reads_every_loss_setting():
    cfg = case_config("all")
    fcos, mask = FCOSLoss.from_config(cfg), MaskLoss.from_config(cfg)
    w = cfg.loss_weights
    assert (fcos.num_classes, fcos.strides, fcos.sizes_of_interest) == (3, (8, 16, 32, 64, 128), (32, 64, 128, 256))
    assert (fcos.center_sample_radius, fcos.focal_alpha, fcos.focal_gamma) == (2.0, 0.3, 1.5)
    assert (fcos.weight_cls, fcos.weight_box, fcos.weight_ctr) == (w.fcos_cls, w.fcos_box, w.fcos_ctr)
    assert (mask.jaccard_silhouette, mask.weight_bce, mask.weight_iou, mask.weight_aux) == (
        True, w.mask_bce, w.mask_iou, w.mask_aux)
    model = SEPSNet(cfg)
    assert model.fcos_loss == fcos and model.mask_loss == mask
    assert (model.max_train_instances, model.mask_size) == (10, 28)


def test_losses_are_usable_without_a_config():
    """Explicit arguments only: a loss built by hand equals the one from the config."""
    cfg = case_config("baseline")
    by_hand = MaskLoss(jaccard_silhouette=False, weight_bce=cfg.loss_weights.mask_bce,
                       weight_iou=cfg.loss_weights.mask_iou, weight_aux=cfg.loss_weights.mask_aux)
    assert by_hand == MaskLoss.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 8, 8, generator=g), (torch.rand(3, 8, 8, generator=g) > 0.5).float()
    got = by_hand(logits, targets, torch.ones(3))
    assert set(got) == {"loss_mask_bce"}
    heavier = dataclasses.replace(by_hand, weight_bce=2 * by_hand.weight_bce)
    assert torch.allclose(heavier(logits, targets, torch.ones(3))["loss_mask_bce"], 2 * got["loss_mask_bce"])
    with pytest.raises(ValueError, match="predicts 3 classes, the loss was built for 5"):
        fcos = FCOSLoss(num_classes=5)
        outputs = {k: [torch.zeros(1, c, 2, 2)] * 5 for k, c in
                   (("cls_logits", 3), ("bbox_reg", 4), ("centerness", 1), ("attention", 4))}
        fcos(outputs, [torch.zeros(4, 2)] * 5, [{"boxes": torch.zeros(0, 4), "classes": torch.zeros(0)}])


def test_config_validation_reads_the_one_backbone_registry(monkeypatch):
    """Adding or removing a registry entry is all it takes for validation to accept or refuse a name."""
    from sepsnet.config import BackboneConfig, ModelConfig, validate_model
    from sepsnet.errors import ConfigError
    from sepsnet.model import registry

    cfg = ModelConfig(backbone=BackboneConfig(name="resnet152"))
    with pytest.raises(ConfigError, match="'resnet152' not in"):
        validate_model(cfg)
    monkeypatch.setitem(registry.BACKBONES, "resnet152", registry.BackboneSpec("resnet152", (3, 8, 36, 3), True))
    validate_model(cfg)
    monkeypatch.delitem(registry.BACKBONES, "resnet50")
    with pytest.raises(ConfigError, match="'resnet50' not in"):
        validate_model(ModelConfig())
