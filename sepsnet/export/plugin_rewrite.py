"""Replace the unfused blender subgraph (paper Eq. 3) with one ``SEPSNetRoiBlend`` plugin node.

Pattern (what ``torch.onnx.export`` writes for ``sepsnet.model.blender.blend``)::

    RoiAlign(bases, boxes, batch_idx) ----------------------------.
    Resize(attention, linear, half_pixel) -> Softmax(axis=1) --> Mul -> ReduceSum(axes=[1], keepdims=0)

becomes ``SEPSNetRoiBlend(bases, boxes, batch_idx, attention)`` with attributes ``out_size``,
``spatial_scale``, ``sampling_ratio``, ``num_bases`` (0 when K is not static), executed by the
TensorRT plugin in ``cpp_plugins/roi_blend`` (the ONNX parser looks plugins up by op type; its
attributes become the plugin fields). RoiAlign/Resize outputs with other consumers (e.g. the
confidence head's base crops) are kept; dead nodes are removed.

Rewrite the fp32 graph: ``sepsnet-export --fp16 --plugin`` fuses first, then converts the fused
graph to fp16 with ``precision.to_fp16``, which keeps this node and the nodes computing its boxes
and batch indices in fp32 (fp32 bases/boxes/attention + int64 indices: a type combination the
plugin supports). An fp16 graph has Casts inside the pattern and is refused with that advice.
"""
from __future__ import annotations

import numpy as np
import onnx

from sepsnet.errors import EngineError

PLUGIN_OP = "SEPSNetRoiBlend"
PLUGIN_DOMAIN = "sepsnet"  # a custom domain keeps onnx.checker happy; TensorRT matches the op type
PLUGIN_VERSION = "1"
_HALF_PIXEL = ("half_pixel", "pytorch_half_pixel")


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:  # pragma: no cover - a hard dependency in pyproject
        raise EngineError(f"onnx-graphsurgeon is required for the plugin rewrite: {exc}") from None
    return gs


def _const(tensor) -> np.ndarray | None:
    """Value of a graphsurgeon tensor when it is a Constant (or a Constant node's output)."""
    gs = _gs()
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return np.asarray(value.values) if value is not None else None
    return None


def _producer(tensor, op: str):
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _attr(node, name: str, default):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _resize_hw(node) -> tuple[int, int] | None:
    """Output H, W of a Resize when they can be read from the graph (sizes or scales)."""
    if node.outputs[0].shape is not None and len(node.outputs[0].shape) == 4:
        h, w = node.outputs[0].shape[2:]
        if isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)):
            return int(h), int(w)
    if len(node.inputs) > 3 and node.inputs[3].name:
        sizes = _const(node.inputs[3])
        if sizes is None:  # dynamo: Concat(Shape(x)[:2], [R, R])
            concat = _producer(node.inputs[3], "Concat")
            sizes = _const(concat.inputs[-1]) if concat is not None else None
        if sizes is not None and sizes.size >= 2:
            return int(sizes.reshape(-1)[-2]), int(sizes.reshape(-1)[-1])
    if len(node.inputs) > 2 and node.inputs[2].name:
        scales = _const(node.inputs[2])
        shape = node.inputs[0].shape
        if scales is not None and scales.size == 4 and shape is not None and \
                all(isinstance(s, (int, np.integer)) for s in shape[2:]):
            return int(shape[2] * scales[2]), int(shape[3] * scales[3])
    return None


def _reduce_axes(node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = _const(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    axes = node.attrs.get("axes")  # opset < 13
    return None if axes is None else [int(a) for a in axes]


def _match(reduce) -> dict | None:
    """The blend nodes feeding one ReduceSum, or None when it is not the blender."""
    if reduce.op != "ReduceSum" or int(_attr(reduce, "keepdims", 1)) != 0 or _reduce_axes(reduce) not in ([1], [-3]):
        return None
    mul = _producer(reduce.inputs[0], "Mul")
    if mul is None or len(mul.inputs) != 2:
        return None
    roi = next((t.inputs[0] for t in mul.inputs if len(t.inputs) == 1 and t.inputs[0].op == "RoiAlign"), None)
    soft = next((t.inputs[0] for t in mul.inputs if len(t.inputs) == 1 and t.inputs[0].op == "Softmax"), None)
    if roi is None or soft is None or int(_attr(soft, "axis", -1)) not in (1, -3):
        return None
    resize = _producer(soft.inputs[0], "Resize")
    if resize is None or _attr(resize, "mode", "nearest") != "linear" or \
            _attr(resize, "coordinate_transformation_mode", "half_pixel") not in _HALF_PIXEL or \
            int(_attr(resize, "antialias", 0)) != 0:
        return None
    if _attr(roi, "coordinate_transformation_mode", "half_pixel") != "half_pixel" or \
            _attr(roi, "mode", "avg") != "avg":
        return None
    out_h, out_w = int(_attr(roi, "output_height", 1)), int(_attr(roi, "output_width", 1))
    if out_h != out_w or _resize_hw(resize) != (out_h, out_w):
        return None
    shape = roi.inputs[0].shape
    k = shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], (int, np.integer)) else 0
    return {"roi": roi, "resize": resize, "reduce": reduce, "out_size": out_h,
            "spatial_scale": float(_attr(roi, "spatial_scale", 1.0)),
            "sampling_ratio": int(_attr(roi, "sampling_ratio", 0)), "num_bases": int(k)}


def rewrite_roi_blend(model: onnx.ModelProto, domain: str = PLUGIN_DOMAIN) -> tuple[onnx.ModelProto, int]:
    """Fuse every blender subgraph into a ``SEPSNetRoiBlend`` node; returns (model, count).

    Raises EngineError when the graph has no blender subgraph to rewrite."""
    gs = _gs()
    graph = gs.import_onnx(model)
    matches = [m for m in (_match(n) for n in graph.nodes) if m is not None]
    if not matches:
        fp16 = onnx.TensorProto.FLOAT16
        casts16 = (n for n in model.graph.node
                   if n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute))
        if any(i.data_type == fp16 for i in model.graph.initializer) or next(casts16, None) is not None:
            raise EngineError("plugin rewrite: this is an fp16 graph (Casts split the RoiAlign/Softmax -> Mul "
                              "blend pattern); rewrite the fp32 graph, then convert it with precision.to_fp16")
        raise EngineError("plugin rewrite: no RoiAlign/Resize/Softmax/Mul/ReduceSum blend subgraph found "
                          "(was the graph exported with model.blender.fused disabled?)")
    for i, m in enumerate(matches):
        roi, reduce = m["roi"], m["reduce"]
        out = reduce.outputs[0]
        reduce.outputs.clear()  # detach: the plugin now produces this tensor
        attrs = {"out_size": m["out_size"], "spatial_scale": m["spatial_scale"],
                 "sampling_ratio": m["sampling_ratio"], "num_bases": m["num_bases"],
                 "plugin_version": PLUGIN_VERSION, "plugin_namespace": ""}
        graph.nodes.append(gs.Node(op=PLUGIN_OP, name=f"{PLUGIN_OP}_{i}", domain=domain, attrs=attrs,
                                   inputs=[roi.inputs[0], roi.inputs[1], roi.inputs[2], m["resize"].inputs[0]],
                                   outputs=[out]))
    graph.cleanup().toposort()
    out_model = gs.export_onnx(graph)
    out_model.ir_version = model.ir_version
    del out_model.opset_import[:]
    out_model.opset_import.extend(op for op in model.opset_import if op.domain != domain)
    if domain:
        out_model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    onnx.checker.check_model(out_model)
    return out_model, len(matches)

