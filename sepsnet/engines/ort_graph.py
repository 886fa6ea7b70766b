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
  third slower than it needs. When that input is a ``Concat`` along the channels read by nothing
  else, the zero channels are appended to the Concat's last input instead (the same tensor, without
  a copy of the whole input: the mask crop has 1 channel, the concatenation 70).
* A bilinear 2-d float32 upsampling ``Resize`` of a batch of per-instance maps (mode linear, half-pixel
  coordinates, no antialias, a symbolic leading axis, known input and output sizes, the output at
  least the input in both axes and at most ``MAX_UPSAMPLE_PLANE`` pixels) -> two ``MatMul`` with its
  constant interpolation matrices (columns, then rows): the same weighted sums of the same two
  neighbours per axis, so equal up to float rounding for finite inputs (a non-finite value would
  reach its whole row and column through the zero weights). ONNX Runtime's CPU Resize costs about
  3x the two products for the blender's 14 -> 56 attention upsampling (paper Eq. 3, Sec. III-F).

The instance graph is compute-bound after these: the confidence head's four 3x3 convs are about
0.2 GFLOP per instance (14x14, 72 -> 256 -> 128 -> 32 -> 8 channels), three quarters of the
engine, and ONNX Runtime's NCHWc convolutions run them at its GEMM speed.
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
        pads = gs.Constant(f"{tag}_pads", np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64))
        concat = _channel_concat_for(graph, node.inputs[0])
        if concat is not None:  # zero channels after the Concat's last input: the same tensor, a smaller Pad
            last = concat.inputs[-1]
            padded = gs.Variable(f"{tag}_padded_last_input", dtype=last.dtype)
            graph.nodes.append(gs.Node("Pad", inputs=[last, pads], outputs=[padded]))
            concat.inputs[-1] = padded
            out = concat.outputs[0]
            out.shape = [*out.shape[:1], out.shape[1] + extra if isinstance(out.shape[1], int) else None,
                         *out.shape[2:]]
        else:
            padded = gs.Variable(f"{tag}_padded_input", dtype=node.inputs[0].dtype)
            graph.nodes.append(gs.Node("Pad", inputs=[node.inputs[0], pads], outputs=[padded]))
            node.inputs[0] = padded
        w = weight.values
        zeros = np.zeros((w.shape[0], extra, *w.shape[2:]), dtype=w.dtype)
        node.inputs[1] = gs.Constant(f"{tag}_padded_weight", np.concatenate([w, zeros], axis=1))
        count += 1
    return count


def _channel_concat_for(graph, tensor):
    """The 4-d ``Concat`` along axis 1 that produces ``tensor`` when nothing else reads ``tensor``
    and it is not a graph output (so padding its last input pads only this Conv's input), else None."""
    if len(tensor.inputs) != 1 or len(tensor.outputs) != 1 or any(t is tensor for t in graph.outputs):
        return None
    producer = tensor.inputs[0]
    if producer.op != "Concat" or len(producer.inputs) < 1:
        return None
    rank = len(tensor.shape) if tensor.shape is not None else None
    axis = int(producer.attrs.get("axis", 0))
    if rank != 4 or axis not in (1, 1 - rank):
        return None
    return producer


#: largest output plane (H*W) an upsampling ``Resize`` is rewritten for: per-instance maps (the blender's
#: 56x56). The dense graph's feature-map upsamplings (static batch) are left alone: measured no faster as
#: products, and rewriting them would make loading its 50 MB graph take ~1.5 s instead of ~0.1 s
MAX_UPSAMPLE_PLANE = 64 * 64


def _linear_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) matrix of ONNX ``Resize`` linear interpolation along one axis with half-pixel
    coordinates (``x = (o + 0.5) * n_in / n_out - 0.5``, clamped to the input; ``pytorch_half_pixel``
    maps a length-1 output to 0): weights 1 - f and f on the two neighbours."""
    out = np.zeros((n_out, n_in), dtype=np.float64)
    for o in range(n_out):
        x = 0.0 if (mode == "pytorch_half_pixel" and n_out == 1) else (o + 0.5) * n_in / n_out - 0.5
        x = min(max(x, 0.0), n_in - 1.0)
        lo = int(np.floor(x))
        hi = min(lo + 1, n_in - 1)
        frac = x - lo
        out[o, lo] += 1.0 - frac
        out[o, hi] += frac
    return out


def _static_hw(tensor) -> tuple[int, int] | None:
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])


def _upsampling_resize(node, opset: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((h, w), (H, W)) of a Resize that :func:`_upsample_as_matmul` rewrites, else None."""
    import onnx_graphsurgeon as gs

    a = node.attrs
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    if (opset < 11 or node.op != "Resize" or a.get("mode", "nearest") != "linear" or int(a.get("antialias", 0))
            or coord not in ("half_pixel", "pytorch_half_pixel") or a.get("axes") is not None
            or a.get("keep_aspect_ratio_policy", "stretch") != "stretch"):
        return None
    x, y = node.inputs[0], node.outputs[0]
    if x.dtype is None or np.dtype(x.dtype) != np.float32:  # float32 MatMul (the CPU provider's fp16 set is small)
        return None
    hw_in, hw_out = _static_hw(x), _static_hw(y)
    if hw_in is None or hw_out is None or list(x.shape[:2]) != list(y.shape[:2]) or not isinstance(x.shape[0], str):
        return None  # a batch of per-instance maps only: a symbolic leading axis (the dense graph's are left alone)
    if hw_out[0] < hw_in[0] or hw_out[1] < hw_in[1] or hw_out == hw_in or hw_out[0] * hw_out[1] > MAX_UPSAMPLE_PLANE:
        return None
    scales = node.inputs[2] if len(node.inputs) > 2 else None
    if scales is not None and not scales.is_empty():
        # coordinates follow the given scales: only when they are exactly out / in on every axis
        if not isinstance(scales, gs.Constant):
            return None
        sc = scales.values.reshape(-1).tolist()
        if len(sc) != 4 or sc[:2] != [1.0, 1.0] or any(s * i != o for s, i, o in zip(sc[2:], hw_in, hw_out)):
            return None
    return hw_in, hw_out


def _upsample_as_matmul(graph, opset: int) -> int:
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        sizes = _upsampling_resize(node, opset)
        if sizes is None:
            continue
        (h, w), (H, W) = sizes
        coord = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        x, y = node.inputs[0], node.outputs[0]
        dtype = np.float32
        tag = f"{node.name or 'resize'}_{count}"
        cols = gs.Constant(f"{tag}_cols", _linear_weights(w, W, coord).T.astype(dtype))  # (w, W)
        rows = gs.Constant(f"{tag}_rows", _linear_weights(h, H, coord).astype(dtype))  # (H, h)
        wide = gs.Variable(f"{tag}_wide", dtype=dtype)
        graph.nodes += [gs.Node("MatMul", inputs=[x, cols], outputs=[wide]),
                        gs.Node("MatMul", inputs=[rows, wide], outputs=[y])]
        node.outputs.clear()
        count += 1
    return count


def _resize_candidates(model: onnx.ModelProto) -> bool:
    """Whether the graph has a linear Resize and an input with a symbolic leading axis (a quick look at
    the protobuf for what :func:`_upsample_as_matmul` may rewrite)."""
    linear = any(n.op_type == "Resize" and any(a.name == "mode" and a.s == b"linear" for a in n.attribute)
                 for n in model.graph.node)
    return linear and any(i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param
                          for i in model.graph.input)


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
    counts = {"softmax": 0, "roi_align": 0, "conv_channels": 0, "upsample": 0}
    ops = {n.op_type for n in model.graph.node}
    if not ({"Softmax", "RoiAlign"} & ops or _conv_candidates(model) or _resize_candidates(model)) \
            or _has_external_data(model):
        return None, counts
    import onnx_graphsurgeon as gs

    opset = _opset(model)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    counts["softmax"] = _rewrite_softmax(graph, opset)
    counts["roi_align"] = _share_roi_align(graph)
    counts["conv_channels"] = _pad_conv_channels(graph, opset)
    counts["upsample"] = _upsample_as_matmul(graph, opset)
    if not any(counts.values()):
        return None, counts
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out.SerializeToString(), counts
