"""Stuff head, basis head, mask losses and confidence head (Sec. III-C, E, F, G)."""
from __future__ import annotations

import pytest
import torch

from sepsnet.config import ComponentsConfig, HeadsConfig, ModelConfig
from sepsnet.model.basis_head import BasisHead, thing_class_map
from sepsnet.model.confidence_head import ConfidenceHead
from sepsnet.model.mask_losses import MaskAux, MaskLoss, mask_silhouette_target, mask_targets, soft_jaccard
from sepsnet.model.stuff_head import StuffHead


def _cfg(**components) -> ModelConfig:
    return ModelConfig(fpn_channels=16, num_thing_classes=3, num_stuff_classes=4,
                       heads=HeadsConfig(stuff_channels=16, basis_channels=16,
                                         basis_num_convs=1),
                       components=ComponentsConfig(**components))


def mask_losses(logits, targets, weights, cfg: ModelConfig, aux=None) -> dict[str, torch.Tensor]:
    return MaskLoss.from_config(cfg)(logits, targets, weights, aux)


def _fpn(h: int, w: int, c: int = 16) -> list[torch.Tensor]:
    """Random P2..P5 with the backbone's ceil(size / stride) sizes."""
    return [torch.randn(1, c, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("hw", [(480, 640), (513, 1025), (128, 256)])
def test_head_shapes(hw):
    h, w = hw
    cfg = _cfg()
    p2, p3, p4, p5 = _fpn(h, w)
    logits, sil = StuffHead.from_config(cfg)([p2, p3, p4, p5])
    assert logits.shape == (1, 5, p2.shape[2], p2.shape[3]) and logits.dtype == torch.float32
    assert sil.shape == (1, 1, p2.shape[2], p2.shape[3])
    bases, sem = BasisHead.from_config(cfg)([p3, p4, p5], p2)
    assert bases.shape == (1, 5, p2.shape[2], p2.shape[3])  # K=4 + silhouette basis
    assert sem.shape == (1, 4, p3.shape[2], p3.shape[3])
    rois = torch.tensor([[0, 10.0, 20.0, 200.0, 120.0], [0, 0.0, 0.0, 32.0, 32.0]])
    probs = torch.rand(2, 56, 56)
    raw = ConfidenceHead.from_config(cfg)(p3, bases, rois, probs)
    assert raw.shape == (2, 2)
    iou, s = ConfidenceHead.scores(raw)
    assert ((iou > 0) & (iou < 1)).all() and torch.allclose(s * s, torch.sigmoid(raw[:, 1]))


def test_deploy_and_components_off_build_no_aux():
    cfg = _cfg(silhouette_stuff=False, silhouette_feature=False)
    p2, p3, p4, p5 = _fpn(64, 64)
    assert StuffHead.from_config(cfg)([p2, p3, p4, p5])[1] is None
    bases, _ = BasisHead.from_config(cfg)([p3, p4, p5], p2)
    assert bases.shape[1] == 4
    assert StuffHead.from_config(_cfg(), deploy=True).silhouette is None
    assert BasisHead.from_config(_cfg(), deploy=True).semantic is None


def test_stuff_and_basis_losses():
    cfg = _cfg()
    p2, p3, p4, p5 = _fpn(64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    stuff = torch.zeros(64, 64, dtype=torch.int64)
    stuff[40:] = 2
    stuff[masks[0].bool()] = 4
    stuff[60:] = 255
    head = StuffHead.from_config(cfg)
    logits, sil = head([p2, p3, p4, p5])
    losses = head.losses(logits, sil, stuff[None])
    assert set(losses) == {"loss_stuff", "loss_stuff_silhouette"}
    all_ignored = head.losses(logits, sil, torch.full((1, 64, 64), 255))
    assert all_ignored["loss_stuff"].item() == 0.0
    basis = BasisHead.from_config(cfg)
    bases, sem = basis([p3, p4, p5], p2)
    tg = [dict(masks=masks, classes=torch.tensor([2]), stuff=stuff)]
    bl = basis.losses(bases, sem, tg)
    assert set(bl) == {"loss_basis_silhouette", "loss_basis_semantic"}
    for v in list(losses.values()) + list(bl.values()):
        assert torch.isfinite(v) and v.item() > 0
        v.backward(retain_graph=True)
    cmap = thing_class_map(masks, torch.tensor([2]), stuff)
    assert cmap[20, 20] == 3 and cmap[45, 5] == 0 and cmap[62, 5] == 255


def test_mask_targets_and_losses():
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 10:20, 10:30] = 1
    masks[1, :, :20] = 1
    rois = torch.tensor([[0, 10.0, 10.0, 30.0, 20.0], [1, 0.0, 0.0, 40.0, 40.0]])
    t = mask_targets(masks, rois, 8)
    assert t.shape == (2, 8, 8)
    assert t[0].all() and t[1, :, :4].all() and not t[1, :, 4:].any()
    assert soft_jaccard(t, t).abs().max() < 1e-6
    cfg = _cfg()
    logits = torch.randn(2, 8, 8, requires_grad=True)
    aux = MaskAux()(logits)
    w = torch.tensor([0.5, 1.0])
    full = mask_losses(logits, t, w, cfg, aux)
    assert set(full) == {"loss_mask_bce", "loss_mask_iou", "loss_mask_silhouette", "loss_mask_aux"}
    sum(full.values()).backward()
    assert torch.isfinite(logits.grad).all()
    bce_only = mask_losses(logits, t, w, _cfg(mask_loss=False))
    assert set(bce_only) == {"loss_mask_bce"}
    assert torch.allclose(bce_only["loss_mask_bce"], full["loss_mask_bce"])
    # a near-perfect prediction has small mask losses
    good = mask_losses((t * 2 - 1) * 20, t, w, cfg)
    assert all(v.item() < 1e-3 for v in good.values())
    empty = mask_losses(torch.zeros(0, 8, 8, requires_grad=True), torch.zeros(0, 8, 8),
                        torch.zeros(0), cfg)
    assert all(v.item() == 0.0 for v in empty.values())


def test_mask_silhouette_is_the_inner_boundary_ring():
    t = torch.zeros(1, 8, 8)
    t[0, 2:6, 2:6] = 1
    sil = mask_silhouette_target(t)[0]
    ring = t[0].clone()
    ring[3:5, 3:5] = 0
    assert torch.equal(sil, ring)  # 12 mask pixels with an outside neighbour, nothing outside
    full = torch.ones(1, 8, 8)  # a crop inside one object: the crop border is not an edge
    assert mask_silhouette_target(full).sum() == 0


def test_mask_aux_can_learn_the_silhouette():
    torch.manual_seed(1)
    t = torch.zeros(4, 24, 24)
    t[:, 5:18, 6:20] = 1
    aux, g = MaskAux(), mask_silhouette_target(t)
    from sepsnet.model.silhouette import dice_loss
    # the Laplacian initialisation already finds the inner ring of sharp logits ...
    assert dice_loss(torch.sigmoid(aux((t * 2 - 1) * 3)), g).item() < 0.1
    # ... and from a random start the two convs learn it
    aux.conv1.reset_parameters()
    aux.conv2.reset_parameters()
    opt = torch.optim.Adam(aux.parameters(), lr=5e-2)
    losses = []
    for _ in range(300):
        loss = dice_loss(torch.sigmoid(aux((t * 2 - 1) * 3)), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < losses[0]


def test_confidence_targets():
    gt = torch.zeros(1, 16, 16)
    gt[0, 4:12, 4:12] = 1
    t = ConfidenceHead.targets(gt.clone(), gt)
    assert torch.allclose(t, torch.ones(1, 2))
    half = torch.zeros(1, 16, 16)
    half[0, 4:12, 4:8] = 0.9
    t = ConfidenceHead.targets(half, gt)
    assert abs(t[0, 0].item() - 0.5) < 1e-6 and 0 < t[0, 1].item() < 1


def test_mask_loss_values_by_hand():
    """Each mask loss against a direct numpy evaluation of its formula, with unequal weights."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    t = torch.zeros(2, 6, 6)
    t[0, 1:5, 1:4] = 1
    t[1, 2:6, 0:6] = 1
    logits = torch.randn(2, 6, 6, generator=g) * 2
    w = torch.tensor([0.25, 1.0])
    cfg = _cfg()
    cfg.loss_weights.mask_bce, cfg.loss_weights.mask_iou, cfg.loss_weights.mask_aux = 1.5, 2.0, 0.3
    aux = torch.randn(2, 6, 6, generator=g)
    got = mask_losses(logits, t, w, cfg, aux)

    x, y, wn = logits.double().numpy(), t.double().numpy(), w.double().numpy()
    p = 1 / (1 + np.exp(-x))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=(1, 2))
    want_bce = 1.5 * (bce * wn).sum() / wn.sum()
    inter = (p * y).sum(axis=(1, 2))
    jac = 1 - inter / ((p ** 2).sum(axis=(1, 2)) + (y ** 2).sum(axis=(1, 2)) - inter + 1e-5)
    want_iou = 2.0 * jac.mean()

    def lap(a):  # 8-neighbour Laplacian, replicate padding, written out
        pad = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = 9 * a
        for dy in range(3):
            for dx in range(3):
                out = out - pad[:, dy:dy + 6, dx:dx + 6]
        return out

    def dice(a, b):  # Eq. 1 with smoothing 1, squared sums, mean of 1 - score
        s = (2 * (a * b).sum(axis=(1, 2)) + 1) / ((a ** 2).sum(axis=(1, 2)) + (b ** 2).sum(axis=(1, 2)) + 1)
        return (1 - s).mean()

    sil_gt = (lap(y) > 0).astype(np.float64)
    want_sil = 0.5 * 2.0 * dice(np.clip(lap(p), 0, 1), sil_gt)
    want_aux = 0.3 * dice(1 / (1 + np.exp(-aux.double().numpy())), sil_gt)
    for key, want in [("loss_mask_bce", want_bce), ("loss_mask_iou", want_iou),
                      ("loss_mask_silhouette", want_sil), ("loss_mask_aux", want_aux)]:
        assert abs(got[key].item() - want) < 1e-5, (key, got[key].item(), want)


def test_confidence_head_architecture():
    cfg = _cfg()
    head = ConfidenceHead.from_config(cfg)
    convs = [m for m in head.convs if isinstance(m, torch.nn.Conv2d)]
    # input: FPN channels + K bases + silhouette basis + mask probabilities
    assert convs[0].in_channels == cfg.fpn_channels + cfg.blender.num_bases + 1 + 1
    assert [c.out_channels for c in convs] == [256, 128, 32, 8]
    assert [c.stride for c in convs] == [(1, 1)] * 3 + [(2, 2)]
    fcs = [m for m in head.fc if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(8 * 7 * 7, 56), (56, 2)]
    # without the silhouette basis there is one channel less
    assert ConfidenceHead.from_config(_cfg(silhouette_feature=False)).convs[0].in_channels == cfg.fpn_channels + 4 + 1
