"""int8 calibration (sepsnet.export.calibration): real frames only unless asked, the predictor's own
preprocessing (one resize policy), the range estimators, and the fp16 Q/DQ bias regression."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sepsnet.cli.export import main as export_main
from sepsnet.config import load_config
from sepsnet.data.synthetic import generate
from sepsnet.data.transforms import inference_sizes
from sepsnet.engines.predictor import PanopticPredictor
from sepsnet.errors import ConfigError, DataError
from sepsnet.export import calibration, precision

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 96


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.mark.parametrize("input_hw", [(H, W), (256, 384), None])
def test_calibration_and_predictor_give_the_same_tensor(ckpt: Path, tmp_path: Path, input_hw) -> None:
    """One resize policy: the calibration input of a frame is the predictor's input tensor for that frame,
    for a static size smaller than the evaluation size (shrunk), larger (padded, never enlarged) and dynamic."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "frame.png"), frame[..., ::-1])  # lossless; read back as RGB
    predictor = PanopticPredictor.from_checkpoint(ckpt, device="cpu")
    predictor.input_hw = input_hw
    got = calibration.calibration_inputs(tmp_path, predictor.data, input_hw, count=1)
    expected, (resized, _) = predictor.preprocess(frame)
    assert len(got) == 1 and got[0].shape == tuple(expected.shape)
    assert torch.equal(torch.from_numpy(got[0]), expected)  # same function, same machine: bit-identical
    assert resized == inference_sizes(150, 230, predictor.data, input_hw)[0]
    if input_hw == (256, 384):  # evaluation resize (shorter edge 256 -> 256x392 capped at 384 wide), no letterbox
        assert resized == (250, 384) and float(np.abs(got[0][0, :, resized[0]:, :]).max()) == 0.0


def test_calibration_sources(ckpt: Path, tmp_path: Path) -> None:
    """A folder of images (spread over the sorted files), or a dataset root whose train split is used."""
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((40, 50, 3), 60 * i, np.uint8))
    files = calibration.spread(calibration.source_files(tmp_path), 2)
    assert [f.name for f in files] == ["f0.png", "f3.png"]  # first and last: spread, not the first two
    data = copy.deepcopy(load_config(ROOT / "configs" / "tiny_synthetic.yaml").data)
    data.pixel_mean, data.pixel_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    batches = calibration.calibration_inputs(tmp_path, data, (H, W), count=2)
    assert len(batches) == 2 and batches[1].shape == (1, 3, H, W)
    (rh, rw), _ = inference_sizes(40, 50, data, (H, W))
    assert float(batches[1][0, 0, 0, 0]) == 180.0 and float(batches[1][0, :, :, rw:].max()) == 0.0
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="has no images"):
        calibration.calibration_inputs(tmp_path / "none", data, (H, W))
    with pytest.raises(DataError, match="does not exist"):
        calibration.source_files(tmp_path / "missing")
    root = tmp_path / "syn"
    generate(root, 3, 2, seed=3, size=64)
    train = calibration.source_files(root)
    assert len(train) == 3 and all(p.parent.name == "train" for p in train)


def test_int8_without_calibration_data_is_refused(ckpt: Path, tmp_path: Path, capsys) -> None:
    """--int8 without --calib: a one-line error saying how to calibrate, before anything is written;
    `--calib synthetic` is the explicit smoke-test opt-in."""
    out = tmp_path / "b"
    assert export_main([str(ckpt), "--out", str(out), "--int8", "--onnx-only"]) == 2
    err = capsys.readouterr().err
    assert "--int8 needs real calibration images" in err and "--calib DIR" in err and "--calib synthetic" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ConfigError, match="--calib synthetic"):
        calibration.require_source(None)
    assert calibration.require_source("synthetic") == "synthetic"
    assert export_main([str(ckpt), "--out", str(out), "--int8", "--onnx-only", "--calib", "synthetic",
                        "--calib-method", "median"]) == 2  # argparse: not a method, one line
    assert "invalid choice: 'median'" in capsys.readouterr().err


def _conv_net() -> torch.nn.Module:
    """A quantized conv with the FCOS classification prior bias (-4.6) and small weights."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 3, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.01)
    torch.nn.init.constant_(conv.bias, -4.6)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), conv).eval()


@pytest.mark.parametrize("method", calibration.METHODS)
def test_fp16_qdq_bias_survives_bias_quantization(tmp_path: Path, method: str) -> None:
    """The TensorRT 11 int8 graph regression (28 PQ lost): a quantized conv with an fp16 bias of -4.6 over
    activation x weight scales near 1e-5. Folded into the int8 conv by ORT (WeightBiasQuantization, default
    optimisation level), bias / (s_x * s_w) overflows fp16 and the bias is lost (here: the output is a
    constant, 0.34 off; on the tiny model the class logits were ~3e4 off). With the bias as a separate Add,
    the Q/DQ fp16 graph is as close to fp32 as the Q/DQ fp32 graph, for every range method."""
    net = _conv_net()
    x = torch.randn(1, 3, 16, 16)
    torch.onnx.export(net, (x,), str(tmp_path / "f32.onnx"), input_names=["image"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    precision.to_fp16(tmp_path / "f32.onnx", tmp_path / "f16.onnx")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 3, 16, 16, generator=gen).numpy() for _ in range(4)]
    calibration.to_int8_qdq(tmp_path / "f32.onnx", tmp_path / "q32.onnx", batches, method=method)
    q16 = calibration.to_int8_qdq(tmp_path / "f16.onnx", tmp_path / "q16.onnx", batches, method=method)
    assert precision.is_fp16_graph(q16) and precision.count_ops(q16, "Add")["Add"] >= 1
    inits = {i.name for i in q16.graph.initializer}
    assert not [n.name for n in q16.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]
    ref = net(x).detach().numpy()
    got16 = ort.InferenceSession(str(tmp_path / "q16.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]  # default session options: every ORT optimisation, as OrtBackend
    got32 = ort.InferenceSession(str(tmp_path / "q32.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    assert np.isfinite(got16).all()
    assert float(np.abs(got16 - ref).max()) <= 2 * float(np.abs(got32 - ref).max()) + 0.05


def test_split_fp16_biases_keeps_fp32_graphs(tmp_path: Path) -> None:
    """Only fp16 biases of quantized convs move; an fp32 Q/DQ graph is left as ORT wrote it."""
    net = _conv_net()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(tmp_path / "f32.onnx"), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    q = calibration.to_int8_qdq(tmp_path / "f32.onnx", tmp_path / "q.onnx", [np.zeros((1, 3, 8, 8), np.float32)])
    before = [n.op_type for n in q.graph.node]
    assert [n.op_type for n in calibration.split_fp16_biases(onnx.ModelProto.FromString(q.SerializeToString()))
            .graph.node] == before


def _input_scale(model: onnx.ModelProto) -> float:
    """The activation scale of the graph input's QuantizeLinear."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    return float(inits[q.input[1]])


def test_entropy_clips_outliers_that_minmax_keeps(tmp_path: Path) -> None:
    """A few huge values among unit-normal ones: minmax spends the int8 range on them, the 2048-bin
    KL threshold (TensorRT's entropy calibration) clips them; percentile sits in between or below."""
    net = _conv_net()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(tmp_path / "f32.onnx"), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        x[0, 0, 0, 0] = 200.0  # one outlier per frame
        batches.append(x)
    scales = {m: _input_scale(calibration.to_int8_qdq(tmp_path / "f32.onnx", tmp_path / f"{m}.onnx", batches, method=m))
              for m in calibration.METHODS}
    assert scales["minmax"] == pytest.approx(200.0 / 127, rel=1e-3)
    assert scales["entropy"] < 0.25 * scales["minmax"]
    assert 3.0 / 127 < scales["entropy"]  # still covers the bulk of the unit-normal values
