"""ONNX rewrite of the unfused blender into one SEPSNetRoiBlend node (export --plugin)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sepsnet.errors import EngineError
from sepsnet.export.plugin_rewrite import PLUGIN_DOMAIN, PLUGIN_OP, rewrite_roi_blend

K, M, R = 4, 14, 56


class UnfusedBlend(torch.nn.Module):
    """Blender as the model exports it: bases[:, :K], roi_align(aligned), upsample, softmax, sum."""

    def forward(self, bases, rois, attention):
        crops = roi_align(bases[:, :K], rois, (R, R), 0.25, 2, aligned=True)
        attn = F.interpolate(attention.reshape(-1, K, M, M), size=(R, R), mode="bilinear",
                             align_corners=False).softmax(dim=1)
        return torch.sigmoid((crops * attn).sum(dim=1)), crops.mean(dim=(2, 3))


def example(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(2, K + 1, 24, 40, generator=g)
    xy = torch.rand(n, 2, generator=g) * 100
    size = 10 + torch.rand(n, 2, generator=g) * 60
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + size], 1)
    return bases, rois, torch.randn(n, K * M * M, generator=g)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "blend.onnx"
    inst = torch.export.Dim("instances", min=1, max=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(UnfusedBlend().eval(), example(), str(path), opset_version=17, dynamo=True,
                          input_names=["bases", "rois", "attention"], output_names=["mask", "crop_mean"],
                          dynamic_shapes={"bases": None, "rois": {0: inst}, "attention": {0: inst}})
    return path


def test_unrewritten_graph_runs_in_ort(exported):
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for n in (3, 7):
        bases, rois, attention = example(n, seed=n)
        got = sess.run(None, {"bases": bases.numpy(), "rois": rois.numpy(), "attention": attention.numpy()})
        want = UnfusedBlend()(bases, rois, attention)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-5)


def test_rewrite_makes_one_plugin_node(exported):
    model = onnx.load(str(exported))
    ops_before = {n.op_type for n in model.graph.node}
    assert {"RoiAlign", "Resize", "Softmax", "Mul", "ReduceSum"} <= ops_before
    out, count = rewrite_roi_blend(model)
    assert count == 1
    onnx.checker.check_model(out)
    custom = [n for n in out.graph.node if n.domain not in ("", "ai.onnx")]
    assert [n.op_type for n in custom] == [PLUGIN_OP] and custom[0].domain == PLUGIN_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attrs["out_size"] == R and attrs["sampling_ratio"] == 2 and attrs["num_bases"] == K
    assert attrs["spatial_scale"] == pytest.approx(0.25)
    ops_after = [n.op_type for n in out.graph.node]
    # the blend chain is gone; RoiAlign stays because crop_mean still reads the crops
    assert not {"Softmax", "Resize", "ReduceSum"} & set(ops_after) and ops_after.count("RoiAlign") == 1
    assert any(op.domain == PLUGIN_DOMAIN for op in out.opset_import)
    assert [o.name for o in out.graph.output] == ["mask", "crop_mean"]


def test_plugin_node_inputs_reproduce_the_blend(exported):
    """Feed the plugin node's inputs (computed by ORT) to the fused torch op: equals the blend."""
    from sepsnet.ops import roi_blend as rb
    rb.load()
    out, _ = rewrite_roi_blend(onnx.load(str(exported)))
    node = next(n for n in out.graph.node if n.op_type == PLUGIN_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    keep = [n for n in probe.graph.node if n.op_type != PLUGIN_OP and node.output[0] not in n.input]
    del probe.graph.node[:]
    probe.graph.node.extend(keep)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in node.input)
    del probe.opset_import[:]
    probe.opset_import.extend(op for op in out.opset_import if op.domain != PLUGIN_DOMAIN)
    bases, rois, attention = example(5, seed=11)
    feeds = {"bases": bases.numpy(), "rois": rois.numpy(), "attention": attention.numpy()}
    names = [i.name for i in probe.graph.input]
    p_bases, boxes, idx, attn = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {k: v for k, v in feeds.items() if k in names})
    assert p_bases.shape == (2, K, 24, 40) and boxes.shape == (5, 4)
    assert idx.shape == (5,) and attn.shape == (5, K, M, M)
    fused_rois = torch.cat([torch.from_numpy(idx).float()[:, None], torch.from_numpy(boxes)], 1)
    got = rb.roi_blend(torch.from_numpy(p_bases), fused_rois, torch.from_numpy(attn), attrs["out_size"],
                       attrs["spatial_scale"], attrs["sampling_ratio"])
    torch.testing.assert_close(torch.sigmoid(got), UnfusedBlend()(bases, rois, attention)[0], atol=1e-5, rtol=0)


def test_rewrite_rejects_graph_without_blend():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(EngineError, match="no RoiAlign"):
        rewrite_roi_blend(onnx.helper.make_model(graph))


def _reference_blend(bases, boxes, idx, attention, attrs):
    """What SEPSNetRoiBlend computes (the unfused blender on the plugin node's inputs), in fp32 torch."""
    rois = torch.cat([torch.as_tensor(idx).float()[:, None], torch.as_tensor(boxes).float()], 1)
    r = int(attrs["out_size"])
    crops = roi_align(torch.as_tensor(bases).float(), rois, (r, r), float(attrs["spatial_scale"]),
                      int(attrs["sampling_ratio"]), aligned=True)
    attn = F.interpolate(torch.as_tensor(attention).float(), size=(r, r), mode="bilinear", align_corners=False)
    return (crops * attn.softmax(dim=1)).sum(dim=1)


def _run_with_plugin(model, feeds):
    """Run a graph holding one SEPSNetRoiBlend node in ORT, the node itself done by the torch reference."""
    (node,) = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    opsets = [op for op in model.opset_import if op.domain != PLUGIN_DOMAIN]
    after, frontier = set(), {node.output[0]}
    for n in model.graph.node:  # nodes are topologically sorted
        if frontier & set(n.input):
            after.add(n.name)
            frontier |= set(n.output)

    def session(nodes, inputs, outputs):
        graph = onnx.helper.make_graph(nodes, "probe", inputs, outputs, initializer=model.graph.initializer,
                                       value_info=model.graph.value_info)
        probe = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
        return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])

    before = [n for n in model.graph.node if n is not node and n.name not in after]
    names = {i.name for i in model.graph.input}
    sess = session(before, list(model.graph.input), [onnx.helper.make_empty_tensor_value_info(t) for t in node.input])
    ins = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    blended = _reference_blend(*ins, attrs).numpy()
    out_vi = next(v for v in model.graph.value_info if v.name == node.output[0])
    rest = [n for n in model.graph.node if n is not node]
    sess = session(rest, list(model.graph.input) + [out_vi], list(model.graph.output))
    full = {**{k: v for k, v in feeds.items() if k in names}, node.output[0]: blended.astype(
        onnx.helper.tensor_dtype_to_np_dtype(out_vi.type.tensor_type.elem_type))}
    return sess.run(None, {k: v for k, v in full.items() if k in {i.name for i in sess.get_inputs()}}), ins


def _dtypes(model):
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.value_info)
             + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def assert_fp16_plugin_graph(model):
    """fp16 graph after the rewrite: one custom node, SEPSNetRoiBlend, fed fp32 bases/boxes/attention and int64
    indices (a supported plugin type combo), and its boxes/indices computed from ``rois`` without any fp16."""
    onnx.checker.check_model(model)
    types = _dtypes(model)
    assert onnx.TensorProto.FLOAT16 in types.values(), "not an fp16 graph"
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert [n.op_type for n in custom] == [PLUGIN_OP]
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [types.get(t) for t in custom[0].input] == [f32, f32, i64, f32]
    assert types.get(custom[0].output[0]) == f32
    producer = {o: n for n in model.graph.node for o in n.output}
    todo, seen = list(custom[0].input[1:3]), set()
    while todo:
        t = todo.pop()
        assert types.get(t) != onnx.TensorProto.FLOAT16, f"box path tensor {t} is fp16"
        if t in producer and t not in seen:
            seen.add(t)
            todo.extend(i for i in producer[t].input if i)
    return custom[0]


def test_rewrite_then_fp16_keeps_plugin_fp32_and_matches(exported):
    from sepsnet.export import precision

    fused, _ = rewrite_roi_blend(onnx.load(str(exported)))
    with pytest.raises(EngineError, match="fp16 graph"):  # the order matters: fp16 first breaks the pattern
        rewrite_roi_blend(precision.to_fp16(onnx.load(str(exported)), exported.parent / "blend.fp16.onnx"))
    g16 = precision.to_fp16(fused, exported.parent / "blend.plugin.fp16.onnx")
    assert_fp16_plugin_graph(g16)
    bases, rois, attention = example(6, seed=5)
    feeds = {"bases": bases.numpy(), "rois": rois.numpy(), "attention": attention.numpy()}
    (mask, crop_mean), (_, boxes, idx, _) = _run_with_plugin(g16, feeds)
    np.testing.assert_array_equal(boxes, rois[:, 1:].numpy())  # boxes reach the plugin unrounded
    np.testing.assert_array_equal(idx, rois[:, 0].long().numpy())
    want = UnfusedBlend()(bases, rois, attention)
    np.testing.assert_allclose(mask, want[0].numpy(), atol=2e-3)
    np.testing.assert_allclose(crop_mean, want[1].numpy(), atol=1e-2)
    # the fp32 rewrite itself, run the same way, equals the unfused blend exactly (within fp32 noise)
    (mask32, _), _ = _run_with_plugin(fused, feeds)
    np.testing.assert_allclose(mask32, want[0].numpy(), atol=1e-5)
