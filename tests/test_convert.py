"""sepsnet-convert: detectron2 / AdelaiDet / SE-PSNet checkpoints (names and shapes from the public
code: detectron2 ResNet + FPN, AdelaiDet FCOSHead, ProtoNet basis module, the BlendMask top_layer,
Panoptic FPN's SemSegFPNHead, SE-PSNet's IOUPredict / AuxConv) -> sepsnet, every tensor accounted for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sepsnet.cli.convert import main as convert_main
from sepsnet.config import SEPSNetConfig
from sepsnet.errors import CheckpointError
from sepsnet.model import build_model
from sepsnet.model.convert import convert_state
from sepsnet.model.weights import checkpoint_config, load_checkpoint, load_model_weights

BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
WIDTH = {2: 64, 3: 128, 4: 256, 5: 512}
FPN, BASIS, STUFF = 32, 32, 32
THINGS, STUFF_CLASSES, ATTN = 3, 2, 4


class Source(dict):
    """A detectron2 state dict built from the layer descriptions (random values)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def _r(self, *shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def conv(self, name: str, cout: int, cin: int, k: int, bias: bool = False) -> None:
        self[name + ".weight"] = self._r(cout, cin, k, k, scale=(2.0 / (cin * k * k)) ** 0.5)
        if bias:
            self[name + ".bias"] = self._r(cout)

    def norm(self, name: str, c: int, stats: bool = False) -> None:
        self[name + ".weight"] = 0.5 + torch.rand(c, generator=self.g)
        self[name + ".bias"] = self._r(c, scale=0.1)
        if stats:
            self[name + ".running_mean"] = self._r(c, scale=0.1)
            self[name + ".running_var"] = 0.5 + torch.rand(c, generator=self.g)


def detectron2_r50_fpn(src: Source, with_p2: bool = True, basic: bool = False) -> None:
    """build_fcos_resnet_fpn_backbone: ResNet (FrozenBN, stats stored) + FPN + top_block p6/p7 from P5.
    ``basic``: the R-18 layout (BasicBlock conv1/conv2, shortcut where the shape changes)."""
    bu = "backbone.bottom_up."
    src.conv(bu + "stem.conv1", 64, 3, 7)
    src.norm(bu + "stem.conv1.norm", 64, stats=True)
    cin = 64
    for stage in (2, 3, 4, 5):
        w = WIDTH[stage]
        cout = w if basic else 4 * w
        for i in range(2 if basic else BLOCKS[stage]):
            p = f"{bu}res{stage}.{i}."
            if i == 0 and cin != cout:
                src.conv(p + "shortcut", cout, cin, 1)
                src.norm(p + "shortcut.norm", cout, stats=True)
            first = cin if i == 0 else cout
            convs = ((w, first, 3), (w, w, 3)) if basic else ((w, first, 1), (w, w, 3), (cout, w, 1))
            for k, (co, ci, ks) in enumerate(convs, 1):
                src.conv(f"{p}conv{k}", co, ci, ks)
                src.norm(f"{p}conv{k}.norm", co, stats=True)
        cin = cout
    for level in (2, 3, 4, 5) if with_p2 else (3, 4, 5):
        src.conv(f"backbone.fpn_lateral{level}", FPN, WIDTH[level] * (1 if basic else 4), 1, bias=True)
        src.conv(f"backbone.fpn_output{level}", FPN, FPN, 3, bias=True)
    src.conv("backbone.top_block.p6", FPN, FPN, 3, bias=True)
    src.conv("backbone.top_block.p7", FPN, FPN, 3, bias=True)


def adelaidet_fcos_head(src: Source, use_scale: bool) -> None:
    """FCOSHead: cls/bbox towers of [conv, GN, ReLU] x 4 (indices 0,1 / 3,4 / ...), empty share tower."""
    h = "proposal_generator.fcos_head."
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):
            src.conv(f"{h}{tower}.{3 * i}", FPN, FPN, 3, bias=True)
            src.norm(f"{h}{tower}.{3 * i + 1}", FPN)
    src.conv(h + "cls_logits", THINGS, FPN, 3, bias=True)
    src.conv(h + "bbox_pred", 4, FPN, 3, bias=True)
    src.conv(h + "ctrness", 1, FPN, 3, bias=True)
    if use_scale:
        for i in range(5):
            src[f"{h}scales.{i}.scale"] = torch.tensor(1.0 + 0.1 * i)


def blendmask_panoptic(src: Source, num_bases: int, basis_norm: str, sepsnet: bool) -> None:
    """top_layer, ProtoNet basis module (+ seg_head), SemSegFPNHead (GN), SE-PSNet extras."""
    bn = basis_norm == "BN"
    src.conv("top_layer", num_bases * ATTN * ATTN, FPN, 3, bias=True)

    def block(name: str, cout: int, cin: int) -> None:  # conv_with_kaiming_uniform(norm, activation)
        src.conv(name + ".0", cout, cin, 3)
        src.norm(name + ".1", cout, stats=bn)
        if bn:
            src[name + ".1.num_batches_tracked"] = torch.tensor(1000)

    for i in range(3):
        block(f"basis_module.refine.{i}", BASIS, FPN)
    for i in range(3):
        block(f"basis_module.tower.{i}", BASIS, BASIS)
    block("basis_module.tower.4", BASIS, BASIS)  # tower.3 is the Upsample
    src.conv("basis_module.tower.5", num_bases, BASIS, 1, bias=True)
    block("basis_module.seg_head.0", BASIS, FPN)
    block("basis_module.seg_head.1", BASIS, BASIS)
    src.conv("basis_module.seg_head.2", THINGS + 1, BASIS, 1, bias=True)
    for level, n in ((2, 1), (3, 1), (4, 2), (5, 3)):  # one conv per 2x upsampling; odd indices: Upsample
        for k in range(n):
            src.conv(f"panoptic_module.p{level}.{2 * k}", STUFF, FPN if k == 0 else STUFF, 3)
            src.norm(f"panoptic_module.p{level}.{2 * k}.norm", STUFF)
    src.conv("panoptic_module.predictor", STUFF_CLASSES + 1, STUFF, 1, bias=True)
    if sepsnet:
        src.conv("panoptic_module.contour_predictor", 1, STUFF, 3, bias=True)
        for i, (co, ci) in enumerate(((256, FPN + num_bases + 1), (128, 256), (32, 128), (8, 32))):  # last: stride 2
            src.conv(f"blender.iou_head.tower.{i}.0", co, ci, 3, bias=True)
        src["blender.iou_head.tower.5.weight"] = src._r(56, 8 * 7 * 7)
        src["blender.iou_head.tower.5.bias"] = src._r(56)
        src["blender.iou_head.tower.7.weight"] = src._r(2, 56)
        src["blender.iou_head.tower.7.bias"] = src._r(2)
        src.conv("blender.contour_aux_head.tower.0.0", 1, 1, 3, bias=True)
        src.conv("blender.contour_aux_head.tower.1", 1, 1, 1, bias=True)


def blendmask_r50_panoptic_state(seed: int = 0, basic: bool = False) -> Source:
    """AdelaiDet configs/BlendMask/Panoptic/R_50_3x.yaml layout (USE_SCALE False, SyncBN basis module);
    ``basic``: with a detectron2 R-18 trunk instead (fast export test)."""
    src = Source(seed)
    detectron2_r50_fpn(src, basic=basic)
    adelaidet_fcos_head(src, use_scale=False)
    blendmask_panoptic(src, num_bases=4, basis_norm="BN", sepsnet=False)
    return src


def load_by_hand(model: torch.nn.Module, src: dict[str, torch.Tensor], num_convs: int = 3) -> None:
    """The same weights put into the sepsnet modules one by one (attribute access, no key mapping)."""
    def put(param: torch.Tensor, key: str) -> None:
        with torch.no_grad():
            param.copy_(src[key])

    def norm(module: torch.nn.Module, prefix: str) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            if hasattr(module, name) and f"{prefix}.{name}" in src:
                put(getattr(module, name), f"{prefix}.{name}")

    def conv(module: torch.nn.Module, prefix: str) -> None:
        put(module.weight, prefix + ".weight")
        if module.bias is not None:
            put(module.bias, prefix + ".bias")

    body, bu = model.backbone.body, "backbone.bottom_up."
    conv(body.conv1, bu + "stem.conv1")
    norm(body.bn1, bu + "stem.conv1.norm")
    for stage in (2, 3, 4, 5):
        for i, block in enumerate(getattr(body, f"layer{stage - 1}")):
            p = f"{bu}res{stage}.{i}."
            for k in (1, 2, 3):
                conv(getattr(block, f"conv{k}"), f"{p}conv{k}")
                norm(getattr(block, f"bn{k}"), f"{p}conv{k}.norm")
            if block.downsample is not None:
                conv(block.downsample[0], p + "shortcut")
                norm(block.downsample[1], p + "shortcut.norm")
    fpn = model.backbone.fpn
    for level in (2, 3, 4, 5):
        conv(fpn.inner_blocks[level - 2][0], f"backbone.fpn_lateral{level}")
        conv(fpn.layer_blocks[level - 2][0], f"backbone.fpn_output{level}")
    conv(fpn.extra_blocks.p6, "backbone.top_block.p6")
    conv(fpn.extra_blocks.p7, "backbone.top_block.p7")
    head, h = model.fcos_head, "proposal_generator.fcos_head."
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):
            conv(getattr(head, tower)[3 * i], f"{h}{tower}.{3 * i}")
            norm(getattr(head, tower)[3 * i + 1], f"{h}{tower}.{3 * i + 1}")
    for name in ("cls_logits", "bbox_pred", "ctrness"):
        conv(getattr(head, name), h + name)
    conv(head.top_layer, "top_layer")
    for scale in head.scales:
        with torch.no_grad():
            scale.scale.fill_(1.0)
    basis = model.basis_head
    for i, block in enumerate(basis.lateral):
        conv(block[0], f"basis_module.refine.{i}.0")
        norm(block[1], f"basis_module.refine.{i}.1")
    for i, block in enumerate(basis.tower):
        conv(block[0], f"basis_module.tower.{i}.0")
        norm(block[1], f"basis_module.tower.{i}.1")
    conv(basis.refine[0], f"basis_module.tower.{num_convs + 1}.0")
    norm(basis.refine[1], f"basis_module.tower.{num_convs + 1}.1")
    conv(basis.out, f"basis_module.tower.{num_convs + 2}")
    stuff = model.stuff_head
    for level, blocks in zip((2, 3, 4, 5), stuff.scale_heads):
        for k, block in enumerate(blocks):
            conv(block[0], f"panoptic_module.p{level}.{2 * k}")
            norm(block[1], f"panoptic_module.p{level}.{2 * k}.norm")
    w, b = src["panoptic_module.predictor.weight"], src["panoptic_module.predictor.bias"]
    with torch.no_grad():  # detectron2 "things" row 0 -> sepsnet's last row
        stuff.classifier.weight.copy_(torch.cat([w[1:], w[:1]]))
        stuff.classifier.bias.copy_(torch.cat([b[1:], b[:1]]))


def _dense(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.forward_dense(image)


def test_blendmask_r50_panoptic_converts_fully_and_matches_hand_loading() -> None:
    src = blendmask_r50_panoptic_state()
    result = convert_state(dict(src), SEPSNetConfig())
    assert result.unused == {} and result.random == []
    assert set(result.mapped) == set(src)
    assert set(result.filled) == {f"fcos_head.scales.{i}.scale" for i in range(5)}
    m = result.config.model
    assert (m.backbone.name, m.backbone.stride_in_1x1, m.fpn_channels) == ("resnet50", True, FPN)
    assert (m.num_thing_classes, m.num_stuff_classes, m.blender.num_bases, m.blender.attn_size) == (
        THINGS, STUFF_CLASSES, 4, ATTN)
    assert m.heads.basis_norm == "BN" and not m.components.mask_score
    assert result.config.data.input_format == "BGR" and result.config.data.pixel_std == [1.0, 1.0, 1.0]

    converted = build_model(result.config)
    load_model_weights(converted, result.state, "converted", strict=True)
    torch.manual_seed(1)
    by_hand = build_model(result.config)
    load_by_hand(by_hand, src)
    image = torch.randn(1, 3, 64, 96)
    a, b = _dense(converted, image), _dense(by_hand, image)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    semantic = converted.basis_head.semantic
    assert torch.equal(semantic[2].weight, src["basis_module.seg_head.2.weight"])
    assert torch.equal(semantic[0][1].running_var, src["basis_module.seg_head.0.1.running_var"])
    # the stuff "things" row moved last: stuff logits of sepsnet class S are detectron2's row 0
    assert torch.equal(converted.stuff_head.classifier.bias[-1], src["panoptic_module.predictor.bias"][0])


def test_sepsnet_layout_maps_confidence_aux_and_contour_heads() -> None:
    src = Source(3)
    detectron2_r50_fpn(src)
    adelaidet_fcos_head(src, use_scale=True)
    blendmask_panoptic(src, num_bases=5, basis_norm="GN", sepsnet=True)
    result = convert_state(dict(src), SEPSNetConfig())
    assert result.unused == {} and result.random == [] and result.filled == {}
    m = result.config.model
    assert m.blender.num_bases == 5 and not m.components.silhouette_feature
    assert m.components.mask_score and m.components.mask_aux and m.components.silhouette_stuff
    model = build_model(result.config)
    load_model_weights(model, result.state, "converted", strict=True)
    assert torch.equal(model.confidence_head.fc[2].weight, src["blender.iou_head.tower.7.weight"])
    assert torch.equal(model.confidence_head.convs[6].weight, src["blender.iou_head.tower.3.0.weight"])
    assert torch.equal(model.mask_aux.conv1.weight, src["blender.contour_aux_head.tower.0.0.weight"])
    assert torch.equal(model.stuff_head.silhouette.weight, src["panoptic_module.contour_predictor.weight"])
    assert torch.equal(model.fcos_head.scales[3].scale, src["proposal_generator.fcos_head.scales.3.scale"])


def test_fcos_detector_is_a_partial_initialisation() -> None:
    src = Source(5)
    detectron2_r50_fpn(src, with_p2=False)  # FCOS_MS_R_*: FPN on res3..res5
    adelaidet_fcos_head(src, use_scale=True)
    src["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    src["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    with pytest.raises(CheckpointError, match="FCOS detector.*--partial"):
        convert_state(dict(src), SEPSNetConfig())
    result = convert_state(dict(src), SEPSNetConfig(), partial=True)
    assert set(result.unused) == {"pixel_mean", "pixel_std"}
    random = set(result.random)
    assert {"backbone.fpn.inner_blocks.0.0.weight", "fcos_head.top_layer.weight",
            "stuff_head.classifier.weight", "basis_head.out.weight"} <= random
    assert not any(k.startswith(("backbone.body.", "fcos_head.cls_tower", "fcos_head.bbox_tower")) for k in random)
    model = build_model(result.config)
    load_model_weights(model, result.state, "converted", strict=True)


def test_shape_mismatch_and_unknown_source_are_named() -> None:
    src = blendmask_r50_panoptic_state(7)
    src["basis_module.tower.5.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match=r"basis_module\.tower\.5\.bias \[9\] -> basis_head\.out\.bias \[4\]"):
        convert_state(dict(src), SEPSNetConfig())
    with pytest.raises(CheckpointError, match="stem.conv1.weight"):
        convert_state({"model.layer.weight": torch.zeros(1)}, SEPSNetConfig())


def test_cli_convert_then_strict_load_and_meta(tmp_path: Path) -> None:
    src = blendmask_r50_panoptic_state(9)
    path = tmp_path / "model_final.pth"
    torch.save({"model": dict(src), "iteration": 270000}, path)
    cats = [{"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
            {"id": 2, "name": "bicycle", "isthing": 1, "color": [119, 11, 32]},
            {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
            {"id": 92, "name": "banner", "isthing": 0, "color": [255, 255, 128]},
            {"id": 93, "name": "blanket", "isthing": 0, "color": [0, 100, 0]}]
    (tmp_path / "cats.json").write_text(json.dumps({"categories": cats}))
    out = tmp_path / "converted.pt"
    assert convert_main([str(path), "--out", str(out), "--meta", str(tmp_path / "cats.json")]) == 0
    ckpt = load_checkpoint(out)
    cfg = checkpoint_config(ckpt, out)
    assert ckpt["meta"]["stuff"][1]["name"] == "blanket" and cfg.data.input_format == "BGR"
    load_model_weights(build_model(cfg), ckpt["model"], out, strict=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cats[:4]))
    assert convert_main([str(path), "--out", str(tmp_path / "x.pt"), "--meta", str(bad)]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_converted_model_exports_and_runtime_follows_bgr(tmp_path: Path) -> None:
    """The converted checkpoint (detectron2 R-18 names) exports like any other; the bundle carries
    BGR / std 1 and the predictor's preprocessing (both paths) feeds BGR, mean-subtracted pixels; ORT matches eager."""
    import numpy as np
    import onnxruntime as ort

    from sepsnet.cli.export import main as export_main
    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.export.strip import build_deploy_model
    from sepsnet.model.fcos_head import Preselect

    src = blendmask_r50_panoptic_state(11, basic=True)  # R-18 trunk keeps the export quick
    path = tmp_path / "model_final.pth"
    torch.save({"model": dict(src)}, path)
    ckpt_path = tmp_path / "converted.pt"
    assert convert_main([str(path), "--out", str(ckpt_path)]) == 0
    out = tmp_path / "bundle"
    assert export_main([str(ckpt_path), "--out", str(out), "--onnx-only", "--height", "64", "--width", "64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["input_format"] == "BGR" and manifest["input"]["pixel_std"] == [1.0, 1.0, 1.0]

    pred = PanopticPredictor.from_bundle(out, backend="ort")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # RGB
    expect = (torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1).float()
              - torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1))
    for where in ("opencv", "device"):
        pred.preprocess_on = where
        got, _ = pred.preprocess(frame)
        torch.testing.assert_close(got[0], expect, atol=1e-4, rtol=0, msg=where)
        got_bgr, _ = pred.preprocess(np.ascontiguousarray(frame[..., ::-1]), bgr=True)
        torch.testing.assert_close(got_bgr[0], expect, atol=1e-4, rtol=0, msg=where)

    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"]["model"]["backbone"]["name"] == "resnet18"
    assert ckpt["config"]["model"]["backbone"]["stride_in_1x1"] is False
    model, _ = build_deploy_model(checkpoint_config(ckpt, ckpt_path), ckpt["model"], str(ckpt_path))
    image = expect[None]
    preselect = Preselect(**manifest["preselect"]) if manifest.get("preselect") else None
    with torch.no_grad():
        ref = model.eval().forward_dense(image, preselect)
    session = ort.InferenceSession(str(out / "dense.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(names, {"image": image.numpy()})):
        if name in ref:
            got, want = torch.from_numpy(value), ref[name]
            assert got.shape == want.shape, name
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-4 * scale + 1e-5, (name, (got - want).abs().max(), scale)
