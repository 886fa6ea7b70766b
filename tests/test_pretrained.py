"""detectron2/caffe2 .pkl backbones: restricted unpickler, caffe2 names and BGR/std-1 conventions
give the same features as the torchvision-named RGB twin; freeze_at without weights refused."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import BackboneConfig, DataConfig, ModelConfig, SEPSNetConfig, validate_model
from sepsnet.data.transforms import normalize
from sepsnet.errors import CheckpointError, ConfigError
from sepsnet.model.backbone import BackboneFPN
from sepsnet.model.pretrained import MSRA, apply_input_convention, safe_unpickle

BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
WIDTH = {2: 64, 3: 128, 4: 256, 5: 512}
RGB_STD = (58.395, 57.12, 57.375)


def caffe2_r50_blobs(seed: int = 0) -> dict[str, np.ndarray]:
    """MSRA R-50.pkl blob names and shapes (caffe2: conv ``_w``, affine BatchNorm ``_bn_s``/``_bn_b``)."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, np.ndarray] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        blobs[name + "_w"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)

    def bn(name: str, c: int) -> None:
        blobs[name + "_bn_s"] = rng.uniform(0.5, 1.0, c).astype(np.float32)
        blobs[name + "_bn_b"] = (rng.standard_normal(c) * 0.1).astype(np.float32)

    conv("conv1", 64, 3, 7)
    bn("res_conv1", 64)
    cin = 64
    for stage in (2, 3, 4, 5):
        w = WIDTH[stage]
        for i in range(BLOCKS[stage]):
            p = f"res{stage}_{i}_"
            if i == 0:
                conv(p + "branch1", 4 * w, cin, 1)
                bn(p + "branch1", 4 * w)
            conv(p + "branch2a", w, cin if i == 0 else 4 * w, 1)
            bn(p + "branch2a", w)
            conv(p + "branch2b", w, w, 3)
            bn(p + "branch2b", w)
            conv(p + "branch2c", 4 * w, w, 1)
            bn(p + "branch2c", 4 * w)
        cin = 4 * w
    blobs["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    return blobs


def torchvision_twin(blobs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same network with torchvision names, RGB input and ImageNet std: the first conv's input
    channels reversed and scaled by the RGB std; BatchNorm as mean 0 / variance 1 - eps."""
    t = {k: torch.from_numpy(v) for k, v in blobs.items()}
    state = {"conv1.weight": t["conv1_w"].flip(1) * torch.tensor(RGB_STD).view(1, 3, 1, 1)}

    def bn(dst: str, src: str) -> None:
        state[dst + ".weight"], state[dst + ".bias"] = t[src + "_bn_s"], t[src + "_bn_b"]
        state[dst + ".running_mean"] = torch.zeros_like(t[src + "_bn_s"])
        state[dst + ".running_var"] = torch.full_like(t[src + "_bn_s"], 1.0 - 1e-5)

    bn("bn1", "res_conv1")
    for stage in (2, 3, 4, 5):
        for i in range(BLOCKS[stage]):
            p, q = f"layer{stage - 1}.{i}.", f"res{stage}_{i}_"
            for k, branch in ((1, "branch2a"), (2, "branch2b"), (3, "branch2c")):
                state[f"{p}conv{k}.weight"] = t[q + branch + "_w"]
                bn(f"{p}bn{k}", q + branch)
            if i == 0:
                state[p + "downsample.0.weight"] = t[q + "branch1_w"]
                bn(p + "downsample.1", q + "branch1")
    return state


def _backbone(path: Path, stride_in_1x1: bool) -> BackboneFPN:
    torch.manual_seed(0)  # same FPN initialisation for both
    return BackboneFPN("resnet50", 16, freeze_at=2, pretrained=str(path), stride_in_1x1=stride_in_1x1).eval()


def test_caffe2_pkl_bgr_equals_torchvision_twin_on_rgb(tmp_path: Path) -> None:
    blobs = caffe2_r50_blobs()
    pkl = tmp_path / "R-50.pkl"
    pkl.write_bytes(pickle.dumps({"blobs": blobs, "__author__": "MSRA"}, protocol=2))
    twin = tmp_path / "r50_twin.pth"
    torch.save(torchvision_twin(blobs), twin)

    c2 = _backbone(pkl, stride_in_1x1=True)
    assert c2.input_convention == MSRA
    tv = _backbone(twin, stride_in_1x1=True)
    rgb = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    bgr_cfg = DataConfig(input_format="BGR", pixel_mean=list(MSRA.pixel_mean), pixel_std=[1.0, 1.0, 1.0])
    rgb_cfg = DataConfig(input_format="RGB", pixel_mean=list(MSRA.pixel_mean[::-1]), pixel_std=list(RGB_STD))
    with torch.no_grad():
        a = c2(normalize(rgb, bgr_cfg)[None])
        b = tv(normalize(rgb, rgb_cfg)[None])
        wrong = c2(normalize(rgb, rgb_cfg)[None])  # channel order / scale ignored: must differ
    for k in a:
        scale = b[k].abs().max().item()
        assert scale > 0
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4 * scale), k
    assert not torch.allclose(wrong["p3"], b["p3"], rtol=1e-2, atol=1e-2 * b["p3"].abs().max().item())


def test_detectron2_named_pkl_and_stride_check(tmp_path: Path) -> None:
    """detectron2 names under "model" (numpy arrays) load the same trunk; a stride mismatch is named."""
    blobs = caffe2_r50_blobs(2)
    tv = torchvision_twin(blobs)
    d2 = {}
    for k, v in tv.items():
        k2 = k.replace("conv1.weight", "stem.conv1.weight", 1) if k == "conv1.weight" else k
        d2[k2] = v.numpy()
    # rename to detectron2 keys
    renamed = {}
    for k, v in d2.items():
        if k.startswith("bn1."):
            renamed["stem.conv1.norm." + k[4:]] = v
        elif k.startswith("layer"):
            stage, block, rest = k.split(".", 2)
            n = int(stage[5:]) + 1
            rest = rest.replace("downsample.0.weight", "shortcut.weight").replace("downsample.1.", "shortcut.norm.")
            for j in (1, 2, 3):
                rest = rest.replace(f"bn{j}.", f"conv{j}.norm.")
            renamed[f"res{n}.{block}.{rest}"] = v
        else:
            renamed[k] = v
    pkl = tmp_path / "d2.pkl"
    pkl.write_bytes(pickle.dumps({"model": renamed, "__author__": "FAIR"}))
    torch.save(tv, tmp_path / "tv.pth")
    a, b = _backbone(pkl, True), _backbone(tmp_path / "tv.pth", True)
    for k, v in b.body.state_dict().items():
        assert torch.equal(a.body.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="stride_in_1x1=True"):
        BackboneFPN("resnet50", 16, pretrained=str(pkl), stride_in_1x1=False)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_reduce_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "R-50.pkl"
    evil.write_bytes(pickle.dumps({"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "x": _Payload(marker)}))
    with pytest.raises(CheckpointError, match=r"R-50\.pkl: refusing to load (posix|nt)\.system"):
        BackboneFPN("resnet50", 16, pretrained=str(evil))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load builtins.eval"):
        safe_unpickle(pickle.dumps({"a": _Eval()}), "x.pkl")
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        safe_unpickle(b"\x80\x04garbage", "x.pkl")
    assert safe_unpickle(pickle.dumps({"a": np.arange(3), "b": [1, "s", 2.0]}), "ok")["b"] == [1, "s", 2.0]


class _Eval:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_freeze_without_pretrained_is_refused_at_training_start(tmp_path: Path) -> None:
    m = ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=2))
    validate_model(m)  # evaluation / export: fine
    with pytest.raises(ConfigError, match=r"model\.backbone\.freeze_at=2 .*model\.backbone\.pretrained"):
        validate_model(m, training=True)
    validate_model(ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=2, allow_random_frozen=True)),
                   training=True)
    validate_model(ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=0)), training=True)
    with pytest.raises(ConfigError, match="not in"):
        validate_model(ModelConfig(backbone=BackboneConfig(name="vgg16")))


def test_apply_input_convention_from_pkl(tmp_path: Path) -> None:
    pkl = tmp_path / "R-50.pkl"
    pkl.write_bytes(pickle.dumps(caffe2_r50_blobs(3), protocol=2))
    cfg = SEPSNetConfig()
    cfg.model.backbone.pretrained = str(pkl)
    changes = apply_input_convention(cfg)
    assert cfg.data.input_format == "BGR" and cfg.data.pixel_std == [1.0, 1.0, 1.0]
    assert cfg.data.pixel_mean == [103.53, 116.28, 123.675] and cfg.model.backbone.stride_in_1x1
    assert any(c.startswith("data.input_format: RGB -> BGR") for c in changes)
    assert apply_input_convention(cfg) == []  # already consistent
