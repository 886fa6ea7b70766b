"""FCOS box head: locations, dense layout, target assignment, losses, a tiny overfit, ONNX export."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import BackboneConfig, BlenderConfig, FCOSConfig, ModelConfig
from sepsnet.errors import DataError
from sepsnet.model.backbone import BackboneFPN
from sepsnet.model.fcos_head import FCOSHead, compute_locations, dense_predictions, group_norm_groups
from sepsnet.model.fcos_loss import FCOSLoss
from sepsnet.model.fcos_targets import compute_targets as _compute_targets

STRIDES = [8, 16, 32, 64, 128]
T = 3


def _cfg(c: int = 64, radius: float = 1.5, attn: int = 4) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=0), fpn_channels=c,
                       num_thing_classes=T, fcos=FCOSConfig(num_convs=2, center_sample_radius=radius),
                       blender=BlenderConfig(num_bases=4, attn_size=attn))


def compute_targets(locs: list[torch.Tensor], targets: list[dict], cfg: ModelConfig):
    """The target assignment with the settings :class:`FCOSLoss` reads from ``cfg``."""
    spec = FCOSLoss.from_config(cfg)
    return _compute_targets(locs, targets, strides=spec.strides, sizes_of_interest=spec.sizes_of_interest,
                            num_classes=spec.num_classes, center_sample_radius=spec.center_sample_radius)


def fcos_losses(out: dict, locs: list[torch.Tensor], targets: list[dict], cfg: ModelConfig):
    return FCOSLoss.from_config(cfg)(out, locs, targets)


def _features(n: int, h: int, w: int, c: int = 64) -> list[torch.Tensor]:
    """Random P3..P7 for an h x w input, sizes by the backbone's ceil rule."""
    feats, fh, fw = [], math.ceil(h / 8), math.ceil(w / 8)
    for _ in STRIDES:
        feats.append(torch.randn(n, c, fh, fw))
        fh, fw = math.ceil(fh / 2), math.ceil(fw / 2)
    return feats


def _locations(h: int, w: int) -> list[torch.Tensor]:
    return compute_locations(_features(1, h, w, c=1), STRIDES)


def test_group_norm_groups() -> None:
    assert group_norm_groups(256) == 32 and group_norm_groups(64) == 32
    assert group_norm_groups(24) == 12 and group_norm_groups(48) == 24 and group_norm_groups(16) == 8
    assert group_norm_groups(7) == 1
    FCOSHead.from_config(_cfg(c=24))(_features(1, 64, 64, c=24))  # narrow FPN, 1x1 P7, batch 1, train mode


def test_compute_locations_formula() -> None:
    locs = compute_locations([torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 2)], [8, 16])
    assert locs[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert locs[1].tolist() == [[8, 8], [24, 8]]
    assert locs[0].dtype == torch.float32


def test_head_outputs_and_init() -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    head = FCOSHead.from_config(cfg)
    feats = _features(2, 100, 130)
    out = head(feats)
    for level, f in enumerate(feats):
        h, w = f.shape[-2:]
        assert out["cls_logits"][level].shape == (2, T, h, w)
        assert out["bbox_reg"][level].shape == (2, 4, h, w)
        assert out["centerness"][level].shape == (2, 1, h, w)
        assert out["attention"][level].shape == (2, 4 * 4 * 4, h, w)
        assert (out["bbox_reg"][level] >= 0).all()
    prior = torch.sigmoid(head.cls_logits.bias)
    assert torch.allclose(prior, torch.full((T,), cfg.fcos.prior_prob), atol=1e-6)
    # the level stride multiplies the regression: same features, scale 1 -> ratio = stride ratio
    same = [feats[0]] * 5
    regs = head(same)["bbox_reg"]
    assert torch.allclose(regs[1], regs[0] * 2, atol=1e-5) and regs[0].abs().sum() > 0


def test_dense_predictions_layout() -> None:
    torch.manual_seed(0)
    feats = _features(2, 96, 160)
    locs = compute_locations(feats, STRIDES)
    outputs = {
        "cls_logits": [torch.randn(2, T, *f.shape[-2:]) for f in feats],
        "bbox_reg": [torch.rand(2, 4, *f.shape[-2:]) * 50 for f in feats],
        "centerness": [torch.randn(2, 1, *f.shape[-2:]) for f in feats],
        "attention": [torch.randn(2, 16, *f.shape[-2:]) for f in feats],
    }
    d = dense_predictions(outputs, locs)
    n_loc = sum(f.shape[-2] * f.shape[-1] for f in feats)
    assert d["boxes"].shape == (2, n_loc, 4) and d["scores"].shape == (2, n_loc, T)
    assert d["centerness"].shape == (2, n_loc) and d["attention"].shape == (2, n_loc, 16)
    for level, n, i, j in [(0, 1, 3, 7), (2, 0, 1, 4), (4, 1, 0, 1)]:
        h, w = feats[level].shape[-2:]
        idx = sum(f.shape[-2] * f.shape[-1] for f in feats[:level]) + i * w + j
        s = STRIDES[level]
        x, y = j * s + s // 2, i * s + s // 2
        l, t, r, b = outputs["bbox_reg"][level][n, :, i, j].tolist()
        assert torch.allclose(d["boxes"][n, idx], torch.tensor([x - l, y - t, x + r, y + b]))
        assert torch.allclose(d["scores"][n, idx], outputs["cls_logits"][level][n, :, i, j].sigmoid())
        assert torch.allclose(d["centerness"][n, idx], outputs["centerness"][level][n, 0, i, j].sigmoid())
        assert torch.equal(d["attention"][n, idx], outputs["attention"][level][n, :, i, j])


def _level_slices(locs: list[torch.Tensor]) -> list[slice]:
    out, start = [], 0
    for loc in locs:
        out.append(slice(start, start + loc.shape[0]))
        start += loc.shape[0]
    return out


def _find(locs: list[torch.Tensor], level: int, x: float, y: float) -> int:
    start = sum(l.shape[0] for l in locs[:level])
    hit = ((locs[level] - torch.tensor([x, y])).abs().sum(1) == 0).nonzero()
    assert hit.numel() == 1, (level, x, y)
    return start + int(hit)


def test_centre_sampling_and_regression() -> None:
    locs = _locations(128, 128)
    cfg = _cfg()
    (t,) = compute_targets(locs, [{"boxes": torch.tensor([[8.0, 8, 56, 56]]), "classes": torch.tensor([2])}], cfg)
    centre = _find(locs, 0, 28, 28)  # within 1.5*8 = 12 px of the centre (32, 32)
    assert t.labels[centre] == 2 and t.gt_index[centre] == 0
    assert t.reg_targets[centre].tolist() == [20, 20, 28, 28]
    assert math.isclose(float(t.centerness[centre]), 20 / 28, rel_tol=1e-5)
    corner = _find(locs, 0, 12, 12)  # inside the box, outside the centre region
    outside = _find(locs, 0, 60, 60)
    for k in (corner, outside):
        assert t.labels[k] == T and t.gt_index[k] == -1 and t.centerness[k] == 0
    assert int((t.labels != T).sum()) == 4  # P3 locations 28, 36 are strictly inside 32 +- 12; 20 is not
    # P4 location (24, 24) is in the centre region too, but max(l,t,r,b) = 32 is not in [64, 128]
    assert t.labels[_find(locs, 1, 24, 24)] == T
    # radius 0: the whole box counts
    (t0,) = compute_targets(locs, [{"boxes": torch.tensor([[8.0, 8, 56, 56]]), "classes": torch.tensor([2])}],
                            _cfg(radius=0.0))
    assert t0.labels[corner] == 2 and int((t0.labels != T).sum()) == 36


def test_size_of_interest_ranges() -> None:
    locs = _locations(512, 512)
    (t,) = compute_targets(locs, [{"boxes": torch.tensor([[0.0, 0, 400, 400]]), "classes": torch.tensor([1])}],
                           _cfg())
    per_level = [int((t.labels[s] != T).sum()) for s in _level_slices(locs)]
    # near the centre (200, 200) max(l,t,r,b) is 200..296: P5 [128, 256] and P6 [256, 512] only
    assert per_level[2] > 0 and per_level[3] > 0
    assert per_level[0] == per_level[1] == per_level[4] == 0
    assert t.labels[_find(locs, 2, 208, 208)] == 1  # max 208 in [128, 256]
    assert t.labels[_find(locs, 3, 288, 288)] == 1  # max 288 in [256, 512]
    assert t.labels[_find(locs, 3, 224, 224)] == T  # max 224 < 256
    bounds = torch.tensor([-1.0, 64, 128, 256, 512, 1e8])
    for level, sl in enumerate(_level_slices(locs)):
        max_reg = t.reg_targets[sl][t.labels[sl] != T].max(dim=1).values
        assert ((max_reg >= bounds[level]) & (max_reg <= bounds[level + 1])).all()


def test_ambiguity_smallest_area_and_ties() -> None:
    locs = _locations(128, 128)
    big, small = [0.0, 0, 100, 100], [20.0, 20, 80, 80]
    k = _find(locs, 0, 52, 52)  # inside both centre regions, P3 range for both
    for boxes, want in (([big, small], 1), ([small, big], 0), ([small, small], 0)):
        (t,) = compute_targets(locs, [{"boxes": torch.tensor(boxes), "classes": torch.tensor([0, 1])}], _cfg())
        assert int(t.gt_index[k]) == want and int(t.labels[k]) == want


def test_empty_and_bad_targets() -> None:
    locs = _locations(64, 96)
    (t,) = compute_targets(locs, [{"boxes": torch.zeros(0, 4), "classes": torch.zeros(0, dtype=torch.int64)}],
                           _cfg())
    assert (t.labels == T).all() and (t.gt_index == -1).all() and t.reg_targets.shape == (t.labels.shape[0], 4)
    with pytest.raises(DataError, match="class ids"):
        compute_targets(locs, [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "classes": torch.tensor([T])}], _cfg())
    with pytest.raises(DataError, match="boxes"):
        compute_targets(locs, [{"classes": torch.tensor([0])}], _cfg())


def _run_head(cfg: ModelConfig, n: int, h: int, w: int) -> tuple[FCOSHead, dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    head = FCOSHead.from_config(cfg)
    feats = _features(n, h, w)
    return head, head(feats), compute_locations(feats, STRIDES)


def test_losses_with_positives_and_gradients() -> None:
    cfg = _cfg()
    head, out, locs = _run_head(cfg, 2, 128, 160)
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 70, 90], [60, 30, 150, 120]]), "classes": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "classes": torch.zeros(0, dtype=torch.int64)},
    ]
    losses, pos = fcos_losses(out, locs, targets, cfg)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_box", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    p = pos["batch_index"].shape[0]
    assert p > 0 and (pos["batch_index"] == 0).all()  # image 1 has no boxes
    assert set(pos["gt_index"].tolist()) == {0, 1} and pos["attention"].shape == (p, 64)
    assert pos["pred_boxes"].shape == (p, 4) and pos["level"].shape == (p,)
    assert ((pos["centerness_target"] > 0) & (pos["centerness_target"] <= 1)).all()
    # positives agree with the dense layout
    dense = dense_predictions(out, locs)
    tgt = compute_targets(locs, targets, cfg)[0]
    idx = (tgt.labels != T).nonzero().squeeze(1)
    assert torch.allclose(pos["pred_boxes"], dense["boxes"][0, idx])
    assert torch.equal(pos["attention"], dense["attention"][0, idx])
    assert torch.equal(pos["labels"], tgt.labels[idx])
    sizes = [l.shape[0] for l in locs]
    assert torch.equal(pos["level"], torch.bucketize(idx, torch.tensor(sizes).cumsum(0), right=True))
    sum(losses.values()).backward()
    for name in ("cls_logits.weight", "bbox_pred.weight", "ctrness.weight", "scales.0.scale",
                 "cls_tower.0.weight", "bbox_tower.0.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # weights are applied
    cfg2 = _cfg()
    cfg2.loss_weights.fcos_box = 2.0
    losses2, _ = fcos_losses(out, locs, targets, cfg2)
    assert torch.allclose(losses2["loss_fcos_box"], 2 * losses["loss_fcos_box"])


def test_losses_without_positives() -> None:
    cfg = _cfg()
    head, out, locs = _run_head(cfg, 2, 64, 64)
    empty = {"boxes": torch.zeros(0, 4), "classes": torch.zeros(0, dtype=torch.int64)}
    tiny = {"boxes": torch.tensor([[10.0, 10, 10.5, 10.5]]), "classes": torch.tensor([1])}  # between locations
    losses, pos = fcos_losses(out, locs, [empty, tiny], cfg)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_fcos_cls"] > 0 and losses["loss_fcos_box"] == 0 and losses["loss_fcos_ctr"] == 0
    assert pos["batch_index"].numel() == 0 and pos["attention"].shape == (0, 64)
    sum(losses.values()).backward()
    assert head.bbox_pred.weight.grad is not None and head.cls_logits.weight.grad.abs().sum() > 0


def test_small_overfit_lowers_loss() -> None:
    torch.manual_seed(0)
    cfg = _cfg(c=32)
    backbone, head = BackboneFPN.from_config(cfg), FCOSHead.from_config(cfg)
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    image = torch.zeros(1, 3, 128, 128)
    image[:, :, 16:80, 10:60] = 2.0
    image[:, 1, 70:120, 64:124] = -2.0
    targets = [{"boxes": torch.tensor([[10.0, 16, 60, 80], [64, 70, 124, 120]]), "classes": torch.tensor([0, 1])}]
    history = []
    for _ in range(12):
        feats = backbone(image)
        levels = [feats[k] for k in ("p3", "p4", "p5", "p6", "p7")]
        losses, _ = fcos_losses(head(levels), compute_locations(levels, STRIDES), targets, cfg)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        history.append(float(total.detach()))
    assert all(math.isfinite(v) for v in history)
    print("fcos overfit loss", [round(v, 3) for v in history])
    assert min(history[-3:]) < 0.8 * history[0], history


class _Dense(torch.nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone, self.head = BackboneFPN.from_config(cfg), FCOSHead.from_config(cfg)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.backbone(images)
        levels = [f[k] for k in ("p3", "p4", "p5", "p6", "p7")]
        d = dense_predictions(self.head(levels), compute_locations(levels, STRIDES))
        return d["boxes"], d["scores"], d["centerness"], d["attention"]


def test_dense_onnx_export_dynamic(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=0), fpn_channels=16,
                      num_thing_classes=T, fcos=FCOSConfig(num_convs=1), blender=BlenderConfig(attn_size=2))
    model = _Dense(cfg).eval()
    hd, wd = torch.export.Dim("h", min=1, max=64), torch.export.Dim("w", min=1, max=64)
    # example large enough that no level is 1 pixel (torch.export specialises size-1 dims)
    path = tmp_path / "dense.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 256, 288),), str(path), input_names=["images"],
                      output_names=["boxes", "scores", "centerness", "attention"],
                      dynamic_shapes={"images": {2: 32 * hd, 3: 32 * wd}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((128, 192), (320, 96)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        got = session.run(None, {"images": x.numpy()})
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-3)
