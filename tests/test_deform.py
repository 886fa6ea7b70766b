"""Deformable-conv backbones (AdelaiDet BlendMask ``*_dcni3_*``: MODEL.RESNETS.DEFORM_ON_PER_STAGE
[False, True, True, True], DEFORM_MODULATED True, DEFORM_INTERVAL 3): building, the detectron2
``DeformBottleneckBlock`` semantics, conversion of detectron2 names, pretrained trunks, config checks."""
from __future__ import annotations

import pytest
import torch
from test_convert import (
    BLOCKS,
    WIDTH,
    Source,
    _dense,
    adelaidet_fcos_head,
    blendmask_panoptic,
    detectron2_r50_fpn,
    load_by_hand,
)
from torchvision.ops import deform_conv2d

from sepsnet.config import BackboneConfig, ModelConfig, SEPSNetConfig, validate_model
from sepsnet.errors import CheckpointError, ConfigError
from sepsnet.model import build_model
from sepsnet.model.backbone import build_trunk, load_trunk_weights
from sepsnet.model.convert import convert_state
from sepsnet.model.deform import OffsetDeformConv2d, deformable_blocks
from sepsnet.model.weights import load_model_weights

DCNI3 = [False, True, True, True]


def test_interval_picks_every_third_block_of_the_chosen_stages():
    # AdelaiDet resnet_interval: block i of a deformable stage is deformable when i % interval == 0
    assert deformable_blocks(DCNI3, 3, (3, 4, 6, 3)) == [(1, 0), (1, 3), (2, 0), (2, 3), (3, 0)]
    assert deformable_blocks([True, False, False, True], 1, (3, 4, 6, 3)) == [(0, 0), (0, 1), (0, 2), (3, 0),
                                                                               (3, 1), (3, 2)]
    trunk = build_trunk("resnet50", True, tuple(DCNI3), deform_modulated=True, deform_interval=3)
    found = sorted(n for n, m in trunk.named_modules() if isinstance(m, OffsetDeformConv2d))
    assert found == ["layer2.0.conv2", "layer2.3.conv2", "layer3.0.conv2", "layer3.3.conv2", "layer4.0.conv2"]
    first = trunk.layer2[0].conv2
    assert first.offset.out_channels == 27 and first.stride == (1, 1)  # stride_in_1x1: stride on conv1
    assert build_trunk("resnet50", False, tuple(DCNI3)).layer2[0].conv2.stride == (2, 2)
    grouped = build_trunk("resnext50_32x4d", False, (False, False, False, True), deform_num_groups=2).layer4[0].conv2
    assert (grouped.groups, grouped.offset.out_channels) == (32, 36)


def test_zero_offsets_are_the_plain_conv_and_modulation_halves_it():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11)
    for modulated, factor in ((False, 1.0), (True, 0.5)):  # a zero mask logit is sigmoid(0) = 0.5
        dcn = OffsetDeformConv2d(8, 8, stride=2, groups=2, modulated=modulated)
        plain = torch.nn.functional.conv2d(x, dcn.weight, None, 2, 1, 1, 2)
        torch.testing.assert_close(dcn(x), factor * plain, atol=1e-5, rtol=1e-5)


def blendmask_dcni3_state(seed: int = 0) -> Source:
    """configs/BlendMask/Panoptic/R_50_dcni3_5x.yaml: the R_50 panoptic layout plus ``conv2_offset``
    (3x3 conv with bias, 27 outputs: modulated, one group) in blocks 0 and 3 of res3..res5."""
    src = Source(seed)
    detectron2_r50_fpn(src)
    for stage in (3, 4, 5):
        for i in range(0, BLOCKS[stage], 3):
            src.conv(f"backbone.bottom_up.res{stage}.{i}.conv2_offset", 27, WIDTH[stage], 3, bias=True)
    adelaidet_fcos_head(src, use_scale=False)
    blendmask_panoptic(src, num_bases=4, basis_norm="BN", sepsnet=False)
    return src


def test_dcn_blendmask_converts_fully_and_matches_hand_loading_and_detectron2():
    src = blendmask_dcni3_state()
    result = convert_state(dict(src), SEPSNetConfig())
    assert result.unused == {} and result.random == [] and set(result.mapped) == set(src)
    b = result.config.model.backbone
    assert (b.deform_on_per_stage, b.deform_modulated, b.deform_interval, b.deform_num_groups) == (DCNI3, True, 3, 1)
    key = "backbone.bottom_up.res4.3.conv2_offset.weight"
    assert result.mapped[key] == "backbone.body.layer3.3.conv2.offset.weight"

    converted = build_model(result.config)
    load_model_weights(converted, result.state, "converted", strict=True)
    torch.manual_seed(1)
    by_hand = build_model(result.config)
    load_by_hand(by_hand, src)
    with torch.no_grad():
        for stage in (3, 4, 5):
            for i in range(0, BLOCKS[stage], 3):
                offset = getattr(by_hand.backbone.body, f"layer{stage - 1}")[i].conv2.offset
                offset.weight.copy_(src[f"backbone.bottom_up.res{stage}.{i}.conv2_offset.weight"])
                offset.bias.copy_(src[f"backbone.bottom_up.res{stage}.{i}.conv2_offset.bias"])
    image = torch.randn(1, 3, 64, 96)
    a, b2 = _dense(converted, image), _dense(by_hand, image)
    for k in a:
        assert torch.equal(a[k], b2[k]), k

    # detectron2 DeformBottleneckBlock.forward, modulated: chunk the 27 channels in three, offsets are
    # cat(first, second), the mask the sigmoid of the third; evaluated from the source tensors
    block = converted.backbone.body.layer2[0]
    x = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        mid = block.relu(block.bn1(block.conv1(x)))
        p = "backbone.bottom_up.res3.0."
        om = torch.nn.functional.conv2d(mid, src[p + "conv2_offset.weight"], src[p + "conv2_offset.bias"], 1, 1)
        ox, oy, mask = torch.chunk(om, 3, dim=1)
        want = deform_conv2d(mid, torch.cat((ox, oy), 1), src[p + "conv2.weight"], padding=1, mask=mask.sigmoid())
        torch.testing.assert_close(block.conv2(mid), want, atol=1e-5, rtol=1e-5)
        assert om.abs().max() > 0.5  # offsets of a pixel or so: the deformation is exercised


def test_dcn_layout_errors_are_named():
    src = dict(blendmask_dcni3_state())
    bad = dict(src)
    del bad["backbone.bottom_up.res4.3.conv2_offset.weight"], bad["backbone.bottom_up.res4.3.conv2_offset.bias"]
    with pytest.raises(CheckpointError, match="DEFORM_INTERVAL"):
        convert_state(bad, SEPSNetConfig())
    ambiguous = {k: (v[:0].new_zeros((54, *v.shape[1:])) if k.endswith("conv2_offset.weight") else v)
                 for k, v in src.items()}
    with pytest.raises(CheckpointError, match="cannot tell whether the convs are modulated"):
        convert_state(ambiguous, SEPSNetConfig())
    tower = dict(src)
    tower["proposal_generator.fcos_head.cls_tower.9.offset.weight"] = torch.zeros(18, 32, 3, 3)
    with pytest.raises(CheckpointError, match="FCOS.USE_DEFORMABLE"):
        convert_state(tower, SEPSNetConfig())


def test_imagenet_trunk_loads_into_a_deformable_trunk_with_zero_offsets(tmp_path):
    plain = build_trunk("resnet50")
    path = tmp_path / "r50.pth"
    torch.save(plain.state_dict(), path)
    dcn = build_trunk("resnet50", False, tuple(DCNI3), deform_modulated=False, deform_interval=3)
    with torch.no_grad():
        dcn.layer2[0].conv2.offset.bias.fill_(3.0)  # must be reset: the file has no offsets
    load_trunk_weights(dcn, str(path))
    assert torch.equal(dcn.layer3[3].conv2.weight, plain.layer3[3].conv2.weight)
    assert dcn.layer2[0].conv2.offset.bias.abs().sum() == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # zero offsets, not modulated: the plain network
        torch.testing.assert_close(dcn.layer2(dcn.layer1(plain.maxpool(plain.relu(plain.bn1(plain.conv1(x)))))),
                                   plain.layer2(plain.layer1(plain.maxpool(plain.relu(plain.bn1(plain.conv1(x)))))),
                                   atol=1e-4, rtol=1e-4)
    broken = plain.state_dict()
    del broken["layer3.3.conv2.weight"]
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="layer3.3.conv2.weight"):
        load_trunk_weights(dcn, str(path))


@pytest.mark.parametrize("backbone, message", [
    (BackboneConfig(name="resnet18", deform_on_per_stage=DCNI3), "needs a bottleneck trunk"),
    (BackboneConfig(deform_on_per_stage=[True, True]), "needs 4 values"),
    (BackboneConfig(deform_on_per_stage=DCNI3, deform_interval=0), "deform_interval must be >= 1"),
    (BackboneConfig(deform_on_per_stage=DCNI3, deform_num_groups=0), "deform_num_groups must be >= 1"),
])
def test_config_checks_name_the_deform_key(backbone, message):
    with pytest.raises(ConfigError, match=message):
        validate_model(ModelConfig(backbone=backbone), "cfg")


def _dcn_model_config() -> SEPSNetConfig:
    cfg = SEPSNetConfig()
    cfg.model = ModelConfig(backbone=BackboneConfig(name="resnet50", freeze_at=0, deform_on_per_stage=DCNI3,
                                                    deform_modulated=True, deform_interval=3),
                            fpn_channels=16, num_thing_classes=3, num_stuff_classes=2)
    cfg.model.heads.stuff_channels = cfg.model.heads.basis_channels = 16
    cfg.model.fcos.num_convs = cfg.model.heads.basis_num_convs = 1
    return cfg


def test_deformable_model_trains_its_offsets():
    from _loss_batch import toy_batch

    torch.manual_seed(0)
    model = build_model(_dcn_model_config()).train()
    images, targets = toy_batch(n=1, size=64, g=2)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ("layer2.0.conv2.offset.weight", "layer4.0.conv2.offset.bias", "layer3.3.conv2.weight"):
        grad = model.backbone.body.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_deformable_model_exports_to_onnx_deformconv_and_ort_matches(tmp_path):
    """torch's dynamo exporter maps deform_conv2d to ONNX DeformConv (opset 19); ONNX Runtime runs it.
    Below opset 19 the export is refused up front, naming the reason."""
    import onnxruntime as ort

    from sepsnet.errors import EngineError
    from sepsnet.export import onnx_export

    cfg = _dcn_model_config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-zero offsets and masks, so the graph's DeformConv really deforms
        for m in model.modules():
            if isinstance(m, OffsetDeformConv2d):
                m.offset.weight.normal_(0, 0.05)
                m.offset.bias.normal_(0, 0.5)
    shape = onnx_export.ExportShape(height=64, width=64)
    with pytest.raises(EngineError, match="DeformConv needs opset >= 19, asked for 18"):
        onnx_export.export_dense(model, cfg, tmp_path / "d18.onnx", shape, opset=18)
    assert onnx_export.opset_for(cfg) == 19
    with torch.no_grad():
        proto = onnx_export.export_dense(model, cfg, tmp_path / "dense.onnx", shape)
    assert sum(n.op_type == "DeformConv" for n in proto.graph.node) == 5
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 19
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_dense(image)
    session = ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": image.numpy()})))
    for name in ("bases", "p3", "stuff_logits", "scores"):
        torch.testing.assert_close(torch.from_numpy(got[name]), ref[name], atol=1e-3, rtol=1e-3, msg=name)
