"""Backbone + FPN: level shapes for odd sizes, frozen BN, freeze_at, local weight loading."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from sepsnet.config import BackboneConfig, ModelConfig
from sepsnet.errors import CheckpointError, ConfigError, FrameError
from sepsnet.model.backbone import BackboneFPN as _BackboneFPN

LEVELS = ("p2", "p3", "p4", "p5", "p6", "p7")


def _cfg(name: str = "resnet18", freeze_at: int = 0, pretrained: str | None = None, c: int = 64) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name=name, freeze_at=freeze_at, pretrained=pretrained),
                       fpn_channels=c, num_thing_classes=3)


def BackboneFPN(cfg: ModelConfig) -> _BackboneFPN:
    return _BackboneFPN.from_config(cfg)


@pytest.fixture(scope="module")
def r18() -> _BackboneFPN:
    torch.manual_seed(0)
    return BackboneFPN(_cfg())


def _expected_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Documented rule: P2 = ceil(H/4), then each level ceil(previous / 2)."""
    sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(5):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


@pytest.mark.parametrize("shape", [(1, 3, 128, 256), (2, 3, 480, 640), (1, 3, 97, 130)])
def test_level_shapes(r18: _BackboneFPN, shape: tuple[int, int, int, int]) -> None:
    with torch.no_grad():
        feats = r18(torch.randn(*shape))
    assert list(feats) == list(LEVELS)
    assert r18.out_channels == 64
    for name, (h, w) in zip(LEVELS, _expected_sizes(shape[2], shape[3])):
        assert feats[name].shape == (shape[0], 64, h, w), name
        assert torch.isfinite(feats[name]).all()
    if shape[2] % 32 == 0 and shape[3] % 32 == 0:  # exact strides up to P5
        for name, s in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32)):
            assert feats[name].shape[-2:] == (shape[2] // s, shape[3] // s)


def test_bottleneck_trunk_channels() -> None:
    model = BackboneFPN(_cfg("resnet50", c=32))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert feats["p2"].shape == (1, 32, 16, 24) and feats["p7"].shape == (1, 32, 1, 1)


def test_frozen_batchnorm_really_frozen(r18: _BackboneFPN) -> None:
    bns = [m for m in r18.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(bns) > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in r18.modules())
    bn_param_ids = {id(t) for m in bns for t in m.buffers()}
    assert not bn_param_ids & {id(p) for p in r18.parameters()}
    before = {k: v.clone() for k, v in r18.state_dict().items() if "bn" in k or "downsample.1" in k}
    r18.train()
    out = r18(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    after = r18.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    r18.zero_grad(set_to_none=True)


@pytest.mark.parametrize("freeze_at", [0, 1, 2])
def test_freeze_at(freeze_at: int) -> None:
    model = BackboneFPN(_cfg(freeze_at=freeze_at))
    body = model.body
    assert all(p.requires_grad for p in body.conv1.parameters()) == (freeze_at < 1)
    assert all(p.requires_grad for p in body.layer1.parameters()) == (freeze_at < 2)
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in model.fpn.parameters())
    out = model(torch.randn(1, 3, 64, 64))
    out["p3"].sum().backward()
    assert (body.conv1.weight.grad is None) == (freeze_at >= 1)
    assert (body.layer1[0].conv1.weight.grad is None) == (freeze_at >= 2)
    assert body.layer2[0].conv1.weight.grad is not None


def _randomised_torchvision_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ref = getattr(torchvision.models, name)(weights=None)  # regular BatchNorm2d, with fc
    state = ref.state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = torch.rand_like(v) + 0.5  # distinct from any init, positive running_var
    return state


def test_pretrained_local_weights_load(tmp_path: Path) -> None:
    state = _randomised_torchvision_state("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = BackboneFPN(_cfg(pretrained=str(path)))
    own = model.body.state_dict()
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    assert "layer1.0.bn1.running_var" in own and not any(k.startswith("fc.") for k in own)


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        BackboneFPN(_cfg(pretrained=str(tmp_path / "missing.pth")))
    wrong = tmp_path / "r34.pth"
    torch.save(_randomised_torchvision_state("resnet34"), wrong)
    with pytest.raises(CheckpointError, match="unexpected key"):
        BackboneFPN(_cfg(pretrained=str(wrong)))
    state = _randomised_torchvision_state("resnet18")
    state["layer2.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    bad_shape = tmp_path / "shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(CheckpointError, match="layer2.0.conv1.weight"):
        BackboneFPN(_cfg(pretrained=str(bad_shape)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        BackboneFPN(_cfg(pretrained=str(garbage)))


def test_bad_inputs(r18: _BackboneFPN) -> None:
    with pytest.raises(FrameError, match=r"\(N,3,H,W\)"):
        r18(torch.randn(1, 1, 64, 64))
    with pytest.raises(ConfigError, match="backbone.name"):
        BackboneFPN(_cfg(name="vgg16"))
    with pytest.raises(ConfigError, match="freeze_at"):
        BackboneFPN(_cfg(freeze_at=5))
