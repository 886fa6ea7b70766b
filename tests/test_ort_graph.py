"""CPU graph rewrites before ONNX Runtime loads a graph (sepsnet.engines.ort_graph): the same function,
fewer slow kernels; what must not be rewritten is left alone."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sepsnet.engines.ort_backend import OrtBackend
from sepsnet.engines.ort_graph import cpu_graph

NONE = {"softmax": 0, "roi_align": 0, "conv_channels": 0, "upsample": 0}


def _save(path: Path, nodes: list, inputs: dict, outputs: dict[str, list], opset: int = 17,
          inits: dict | None = None) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT if v[0] == "f" else TensorProto.INT64, v[1])
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(source: str | bytes, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_softmax_over_a_middle_axis_is_rewritten_and_equal(tmp_path: Path, opset: int) -> None:
    path = _save(tmp_path / "s.onnx", [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
                 {"x": ("f", [3, 4, 5, 6])}, {"y": [3, 4, 5, 6]}, opset)
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 6)).astype(np.float32) * 20
    rewritten, counts = cpu_graph(path)
    assert counts == {"softmax": 1, "roi_align": 0, "conv_channels": 0, "upsample": 0} and rewritten is not None
    assert "Softmax" not in {n.op_type for n in onnx.load_from_string(rewritten).graph.node}
    got, = _run(rewritten, {"x": x})
    ref, = _run(str(path), {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("axis, opset", [(-1, 17), (3, 17), (1, 11)])
def test_softmax_left_alone(tmp_path: Path, axis: int, opset: int) -> None:
    """The last axis is already fast; before opset 13 Softmax flattens from ``axis`` (another function)."""
    path = _save(tmp_path / "s.onnx", [helper.make_node("Softmax", ["x"], ["y"], axis=axis)],
                 {"x": ("f", [3, 4, 5, 6])}, {"y": [3, 4, 5, 6]}, opset)
    assert cpu_graph(path) == (None, NONE)


def _roi_graph(tmp_path: Path, same_rois: bool) -> Path:
    starts, ends, axes = (np.array([v], np.int64) for v in (0, 4, 1))
    attrs = {"output_height": 7, "output_width": 7, "sampling_ratio": 1, "spatial_scale": 0.25,
             "coordinate_transformation_mode": "half_pixel"}
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["xs"]),
             helper.make_node("RoiAlign", ["xs", "rois", "idx"], ["a"], **attrs),
             helper.make_node("RoiAlign", ["x", "rois" if same_rois else "rois2", "idx"], ["b"], **attrs)]
    inputs = {"x": ("f", [1, 5, 16, 20]), "rois": ("f", [3, 4]), "rois2": ("f", [3, 4]), "idx": ("i", [3])}
    return _save(tmp_path / "r.onnx", nodes, inputs, {"a": [3, 4, 7, 7], "b": [3, 5, 7, 7]}, 17,
                 {"starts": starts, "ends": ends, "axes": axes})


def test_roi_align_of_a_channel_slice_shares_the_full_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rois = np.array([[0, 0, 30, 20], [10.5, 3, 70, 60], [40, 40, 79, 63]], np.float32)
    feeds = {"x": rng.standard_normal((1, 5, 16, 20)).astype(np.float32), "rois": rois, "rois2": rois + 1,
             "idx": np.zeros(3, np.int64)}
    path = _roi_graph(tmp_path, same_rois=True)
    rewritten, counts = cpu_graph(path)
    assert counts == {"softmax": 0, "roi_align": 1, "conv_channels": 0, "upsample": 0}
    assert [n.op_type for n in onnx.load_from_string(rewritten).graph.node].count("RoiAlign") == 1
    got, ref = _run(rewritten, feeds), _run(str(path), feeds)
    assert all(np.array_equal(g, r) for g, r in zip(got, ref))  # RoiAlign is per channel: bit-identical
    assert cpu_graph(_roi_graph(tmp_path, same_rois=False)) == (None, NONE)


def test_backend_loads_the_rewritten_graph_on_cpu_only_when_asked(tmp_path: Path) -> None:
    path = _save(tmp_path / "s.onnx", [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
                 {"x": ("f", [2, 4, 3])}, {"y": [2, 4, 3]})
    assert OrtBackend(path, device="cpu").rewrites == {"softmax": 1, "roi_align": 0, "conv_channels": 0, "upsample": 0}
    assert OrtBackend(path, device="cpu", cpu_rewrites=False).rewrites == {}


@pytest.mark.parametrize("cin, padded", [(70, True), (64, False), (3, False), (18, False)])
def test_conv_input_channels_padded_to_whole_blocks(tmp_path: Path, cin: int, padded: bool) -> None:
    """A Conv whose input channels do not fill whole blocks gets zero channels (input and weight): the same
    output up to float rounding; full blocks, small inputs (an RGB stem) and counts that would need more than
    1/8 more work (18 -> 24) are left alone."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, cin, 3, 3)).astype(np.float32)
    path = _save(tmp_path / "c.onnx", [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                 {"x": ("f", [4, cin, 9, 9])}, {"y": [4, 16, 9, 9]}, 17, {"w": weight})
    rewritten, counts = cpu_graph(path)
    assert counts["conv_channels"] == int(padded) and (rewritten is not None) == padded
    if padded:
        x = rng.standard_normal((4, cin, 9, 9)).astype(np.float32)
        model = onnx.load_from_string(rewritten)
        assert [n.op_type for n in model.graph.node] == ["Pad", "Conv"]
        assert {tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 4} == {(16, 72, 3, 3)}
        np.testing.assert_allclose(_run(rewritten, {"x": x})[0], _run(str(path), {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_padding_of_a_channel_concat_goes_to_its_last_input(tmp_path: Path) -> None:
    """A padded Conv whose input is a channel Concat read by nothing else: the zero channels are appended
    to the Concat's last (here 1-channel) input, not to the whole concatenation; same output."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 70, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Concat", ["a", "b"], ["x"], axis=1),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    path = _save(tmp_path / "cc.onnx", nodes, {"a": ("f", [2, 69, 9, 9]), "b": ("f", [2, 1, 9, 9])},
                 {"y": [2, 16, 9, 9]}, 17, {"w": weight})
    rewritten, counts = cpu_graph(path)
    assert counts["conv_channels"] == 1
    model = onnx.load_from_string(rewritten)
    pad, = [n for n in model.graph.node if n.op_type == "Pad"]
    concat, = [n for n in model.graph.node if n.op_type == "Concat"]
    assert pad.input[0] == "b" and concat.input[-1] == pad.output[0]
    feeds = {"a": rng.standard_normal((2, 69, 9, 9)).astype(np.float32),
             "b": rng.standard_normal((2, 1, 9, 9)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)[0], _run(str(path), feeds)[0], rtol=1e-5, atol=1e-4)


def test_padding_of_a_concat_read_elsewhere_pads_the_conv_input(tmp_path: Path) -> None:
    """When the Concat's output is also a graph output, its last input is left alone (the output keeps
    its 70 channels) and the Conv's own input is padded."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((16, 70, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Concat", ["a", "b"], ["x"], axis=1),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    path = _save(tmp_path / "cc.onnx", nodes, {"a": ("f", [2, 69, 9, 9]), "b": ("f", [2, 1, 9, 9])},
                 {"y": [2, 16, 9, 9], "x": [2, 70, 9, 9]}, 17, {"w": weight})
    rewritten, counts = cpu_graph(path)
    pad, = [n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "Pad"]
    assert counts["conv_channels"] == 1 and pad.input[0] == "x"
    feeds = {"a": rng.standard_normal((2, 69, 9, 9)).astype(np.float32),
             "b": rng.standard_normal((2, 1, 9, 9)).astype(np.float32)}
    got, ref = _run(rewritten, feeds), _run(str(path), feeds)
    assert got[1].shape == (2, 70, 9, 9) and np.array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-4)


def _resize_graph(tmp_path: Path, hw_in: tuple[int, int], hw_out: tuple[int, int], mode: str = "linear",
                  coord: str = "half_pixel", by_scales: bool = False, batch: int | str = "instances") -> Path:
    """A Resize of (batch, 4, h, w) maps; the sizes are computed from the input's shape as the exported
    instance graph does (the leading axis stays symbolic), or given as constant scales."""
    if by_scales:
        scales = np.array([1, 1, hw_out[0] / hw_in[0], hw_out[1] / hw_in[1]], np.float32)
        nodes, inits = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode,
                                         coordinate_transformation_mode=coord)], {"scales": scales}
    else:
        nodes = [helper.make_node("Shape", ["x"], ["lead"], start=0, end=2),
                 helper.make_node("Concat", ["lead", "hw"], ["sizes"], axis=0),
                 helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
                                  coordinate_transformation_mode=coord)]
        inits = {"hw": np.array(hw_out, np.int64)}
    return _save(tmp_path / "rs.onnx", nodes, {"x": ("f", [batch, 4, *hw_in])}, {"y": [batch, 4, *hw_out]}, 18,
                 inits)


@pytest.mark.parametrize("hw_in, hw_out, coord, by_scales", [
    ((14, 14), (56, 56), "half_pixel", False),  # the blender's attention (Eq. 3)
    ((5, 7), (11, 7), "pytorch_half_pixel", False),  # not an integer factor; one axis unchanged
    ((1, 3), (4, 12), "half_pixel", True),  # a length-1 axis; scales instead of sizes
])
def test_bilinear_upsampling_becomes_two_matmuls(tmp_path: Path, hw_in: tuple, hw_out: tuple, coord: str,
                                                 by_scales: bool) -> None:
    path = _resize_graph(tmp_path, hw_in, hw_out, coord=coord, by_scales=by_scales)
    rewritten, counts = cpu_graph(path)
    assert counts == {**NONE, "upsample": 1}
    assert [n.op_type for n in onnx.load_from_string(rewritten).graph.node if n.op_type not in ("Shape", "Concat")
            ] == ["MatMul", "MatMul"]
    x = (np.random.default_rng(5).standard_normal((3, 4, *hw_in)) * 10).astype(np.float32)
    got, ref = _run(rewritten, {"x": x})[0], _run(str(path), {"x": x})[0]
    assert got.shape == ref.shape == (3, 4, *hw_out)  # the symbolic batch of 3
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw_in, hw_out, mode", [((56, 56), (14, 14), "linear"),  # downsampling: Resize is faster
                                                 ((14, 14), (56, 56), "nearest"),
                                                 ((14, 14), (56, 56), "cubic")])
def test_other_resizes_left_alone(tmp_path: Path, hw_in: tuple, hw_out: tuple, mode: str) -> None:
    assert cpu_graph(_resize_graph(tmp_path, hw_in, hw_out, mode=mode)) == (None, NONE)


def test_resize_with_align_corners_left_alone(tmp_path: Path) -> None:
    assert cpu_graph(_resize_graph(tmp_path, (14, 14), (56, 56), coord="align_corners")) == (None, NONE)


@pytest.mark.parametrize("batch, hw_out", [(1, (56, 56)), ("instances", (128, 128))])
def test_dense_feature_map_upsampling_left_alone(tmp_path: Path, batch: int | str, hw_out: tuple) -> None:
    """A static batch (the dense graph's feature maps) or an output plane above MAX_UPSAMPLE_PLANE is not
    rewritten."""
    assert cpu_graph(_resize_graph(tmp_path, (14, 14), hw_out, batch=batch)) == (None, NONE)


def test_float16_upsampling_left_alone(tmp_path: Path) -> None:
    """The products are made in float32 only (an fp16 graph keeps its Resize)."""
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 4, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4, 56, 56])],
                              [numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "h.onnx"))
    assert cpu_graph(tmp_path / "h.onnx") == (None, NONE)
