"""CPU-friendly forms of a bundle graph, made in memory before ONNX Runtime's CPU provider loads it
(issue 13: the instance engine's share of a frame). The files of the bundle are not changed
(TensorRT and the CUDA provider get the graph as exported), and every rewrite computes the same
function:

* ``Softmax`` over an axis that is not the last -> ``exp(x - max) / sum`` over that axis
  (``ReduceMax``, ``Sub``, ``Exp``, ``ReduceSum``, ``Div``), the formula the Softmax kernels use,
  so equal up to float rounding. ONNX Runtime's CPU Softmax moves the axis last and normalises
  row by row; the blender's attention (n, K, R, R) with K = 4 is n*R*R rows of 4 values, and that
  row loop cost more than the rest of the blend (paper Eq. 3).
* ``RoiAlign`` of a channel ``Slice`` of X beside a ``RoiAlign`` of all of X with the same boxes,
  batch indices and attributes -> a ``Slice`` of the latter's output. RoiAlign works channel by
  channel, so this is bit-identical: the blender crops the K blend bases and the confidence head
  all K+1 bases, with the same boxes (Sec. III-F/G).
* A 2-d ``Conv`` (group 1, constant weight) whose input channel count is above ``CHANNEL_BLOCK``
  and a few channels short of a multiple of it (at most 1/8 more work) -> zero channels appended to
  its input (``Pad``) and zero slices to its weight: the same sums plus zeros. ONNX Runtime runs a
  Conv in its blocked NCHWc layout only when the channels fill whole blocks; the confidence head's
  first conv takes 64 + K + 2 = 70 channels (P3 crop, bases, mask; Sec. III-G) and ran about a
  third slower than it needs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _softmax_axis(node, opset: int) -> int | None:
    """The non-negative axis of a Softmax worth rewriting (a known axis that is not the last), else None."""
    if opset < 13:  # before opset 13 Softmax flattens from ``axis`` on: another function
        return None
    axis = int(node.attrs.get("axis", -1))
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    if axis < 0:
        if rank is None:
            return None
        axis += rank
    if rank is not None and axis == rank - 1:
        return None
    return axis


def _rewrite_softmax(graph, opset: int) -> int:
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        if node.op != "Softmax":
            continue
        axis = _softmax_axis(node, opset)
        if axis is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        tag = f"{node.name or 'softmax'}_{count}"
        axes = gs.Constant(f"{tag}_axes", np.array([axis], dtype=np.int64))

        mx, shifted, ex, total = (gs.Variable(f"{tag}_{name}", dtype=x.dtype) for name in ("max", "shifted", "exp",
                                                                                           "sum"))
        reduce_max = (gs.Node("ReduceMax", inputs=[x, axes], outputs=[mx], attrs={"keepdims": 1}) if opset >= 18
                      else gs.Node("ReduceMax", inputs=[x], outputs=[mx], attrs={"keepdims": 1, "axes": [axis]}))
        graph.nodes += [reduce_max,
                        gs.Node("Sub", inputs=[x, mx], outputs=[shifted]),
                        gs.Node("Exp", inputs=[shifted], outputs=[ex]),
                        gs.Node("ReduceSum", inputs=[ex, axes], outputs=[total], attrs={"keepdims": 1}),
                        gs.Node("Div", inputs=[ex, total], outputs=[y])]
        node.outputs.clear()
        count += 1
    return count


def _channel_slice(node) -> tuple[object, list] | None:
    """(sliced tensor, [starts, ends, axes]) of a Slice along axis 1 with step 1 and constant bounds."""
    import onnx_graphsurgeon as gs

    if node.op != "Slice" or len(node.inputs) < 4:
        return None
    bounds = node.inputs[1:]
    if not all(isinstance(b, gs.Constant) for b in bounds):
        return None
    axes = bounds[2].values.reshape(-1).tolist()
    steps = bounds[3].values.reshape(-1).tolist() if len(bounds) > 3 else [1]
    if axes != [1] or steps != [1]:
        return None
    return node.inputs[0], bounds[:3]


def _share_roi_align(graph) -> int:
    import onnx_graphsurgeon as gs

    aligns = [n for n in graph.nodes if n.op == "RoiAlign" and len(n.inputs) == 3]
    count = 0
    for node in aligns:
        src = node.inputs[0]
        producer = src.inputs[0] if len(src.inputs) == 1 else None
        sliced = _channel_slice(producer) if producer is not None else None
        if sliced is None:
            continue
        full_input, bounds = sliced
        twin = next((n for n in aligns if n is not node and n.inputs[0] is full_input
                     and n.inputs[1] is node.inputs[1] and n.inputs[2] is node.inputs[2] and n.attrs == node.attrs
                     and n.outputs), None)
        if twin is None:
            continue
        out = node.outputs[0]
        node.outputs.clear()
        graph.nodes.append(gs.Node("Slice", name=f"{node.name or 'roi_align'}_shared",
                                   inputs=[twin.outputs[0], *bounds], outputs=[out]))
        count += 1
    return count


#: channel multiple a Conv input is padded to (ONNX Runtime's NCHWc blocks are 8 or 16 floats wide; 8
#: was enough for the blocked kernels on the AVX-512 CPU this was measured on)
CHANNEL_BLOCK = 8


def _channels_to_add(cin: int) -> int:
    """Zero channels that bring ``cin`` to a multiple of ``CHANNEL_BLOCK``; 0 when it is one already,
    when ``cin`` is a small stem input (an image), or when padding would add more than 1/8 of the work."""
    extra = -cin % CHANNEL_BLOCK
    return extra if cin > CHANNEL_BLOCK and 8 * extra <= cin else 0


def _pad_conv_channels(graph, opset: int) -> int:
    import onnx_graphsurgeon as gs

    if opset < 11:  # Pad takes its pads as an input from opset 11 on
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op != "Conv" or int(node.attrs.get("group", 1)) != 1 or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or weight.values.ndim != 4:
            continue
        extra = _channels_to_add(weight.values.shape[1])
        if extra == 0:
            continue
        tag = f"{node.name or 'conv'}_{count}"
        padded = gs.Variable(f"{tag}_padded_input", dtype=node.inputs[0].dtype)
        pads = gs.Constant(f"{tag}_pads", np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64))
        graph.nodes.append(gs.Node("Pad", inputs=[node.inputs[0], pads], outputs=[padded]))
        w = weight.values
        zeros = np.zeros((w.shape[0], extra, *w.shape[2:]), dtype=w.dtype)
        node.inputs[0] = padded
        node.inputs[1] = gs.Constant(f"{tag}_padded_weight", np.concatenate([w, zeros], axis=1))
        count += 1
    return count


def _conv_candidates(model: onnx.ModelProto) -> bool:
    """Whether some Conv's weight initializer has an input channel count :func:`_pad_conv_channels` pads
    (a quick look at the protobuf, before any graph is built)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and len(dims.get(node.input[1], [])) == 4:
            if _channels_to_add(dims[node.input[1]][1]):
                return True
    return False


def cpu_graph(path: str | Path) -> tuple[bytes | None, dict[str, int]]:
    """The graph at ``path`` with the rewrites of the module docstring, serialised, and how many of
    each were made; ``(None, counts)`` when there is nothing to rewrite (load the file as it is)."""
    model = onnx.load(str(path), load_external_data=False)
    counts = {"softmax": 0, "roi_align": 0, "conv_channels": 0}
    ops = {n.op_type for n in model.graph.node}
    if not ({"Softmax", "RoiAlign"} & ops or _conv_candidates(model)) or _has_external_data(model):
        return None, counts
    import onnx_graphsurgeon as gs

    opset = _opset(model)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    counts["softmax"] = _rewrite_softmax(graph, opset)
    counts["roi_align"] = _share_roi_align(graph)
    counts["conv_channels"] = _pad_conv_channels(graph, opset)
    if not any(counts.values()):
        return None, counts
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out.SerializeToString(), counts
