"""Reduced-precision ONNX graphs for TensorRT (DESIGN.md "Facts about the export targets").

TensorRT 11 networks are always strongly typed: the precision lives in the graph, not in builder
flags. So fp16 and int8 are produced here, as ONNX, where ONNX Runtime can test them on CPU:

- fp16: ``onnxconverter_common.float16`` with fp32 inputs/outputs and the numerically sensitive
  ops kept in fp32 (RoiAlign, Resize, Softmax, reductions, Exp/Sqrt/Log; see ``FP32_OPS``). The
  ``SEPSNetRoiBlend`` plugin node stays fp32 too (all-fp32 is one of its supported type combos),
  and so does the box path: every node computing the boxes / batch indices of a RoiAlign or of
  the plugin (from ``rois``) keeps fp32, so box coordinates are never rounded to fp16.
- int8: Q/DQ graphs, written and calibrated by ``sepsnet.export.calibration`` (its own module:
  calibration frames, range estimators, the Q/DQ pass). ``to_int8_qdq`` there takes the fp32 graph
  (TensorRT 10: built weakly typed with the INT8 + FP16 flags) or the fp16 graph of :func:`to_fp16`
  (TensorRT 11, strongly typed: the layers left unquantized run in fp16 because the graph says so).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx

from sepsnet.errors import EngineError
from sepsnet.export import surgery
from sepsnet.export.plugin_rewrite import PLUGIN_OP

FP32_OPS = ("RoiAlign", "Resize", "Softmax", "ReduceSum", "ReduceMean", "ReduceMax", "Exp", "Sqrt", "Log",
            "TopK", "NonMaxSuppression", "Range", "CumSum", PLUGIN_OP)
BOX_INPUT_OPS = ("RoiAlign", PLUGIN_OP)  # inputs 1, 2 (boxes, batch indices) are computed in fp32


def to_fp16(src: str | Path | onnx.ModelProto, dst: str | Path,
            keep_fp32_ops: Sequence[str] = FP32_OPS) -> onnx.ModelProto:
    """Convert a graph to fp16 with fp32 I/O, keeping ``keep_fp32_ops`` in fp32; saves ``dst``."""
    from onnxconverter_common import float16

    model = onnx.load(str(src)) if not isinstance(src, onnx.ModelProto) else src
    model = _isolate_outputs(model)
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    box_nodes = _box_path_nodes(model)
    try:
        with warnings.catch_warnings():  # "float32 number ... will be truncated" for tiny weights
            warnings.simplefilter("ignore", UserWarning)
            out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                                   node_block_list=box_nodes, disable_shape_infer=False)
    except Exception as exc:
        raise EngineError(f"fp16 conversion of {src if not isinstance(src, onnx.ModelProto) else 'graph'} "
                          f"failed: {type(exc).__name__}: {exc}") from exc
    out = _drop_cast_roundtrips(out)
    out = _drop_stale_value_info(out)
    onnx.checker.check_model(out)
    surgery.save(out, dst)
    return out


def _isolate_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output that other nodes also read (e.g. ``p3``) its own Identity node.

    ``keep_io_types`` casts outputs back to fp32 under the output's name; without this, the internal
    consumers of that tensor would read the fp32 cast and mix fp16/fp32 inputs (invalid graph)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consumed = {i for n in model.graph.node for i in n.input}
    for out in model.graph.output:
        if out.name not in consumed:
            continue
        inner = f"{out.name}__internal"
        for n in model.graph.node:
            n.output[:] = [inner if o == out.name else o for o in n.output]
            n.input[:] = [inner if i == out.name else i for i in n.input]
        for vi in model.graph.value_info:
            if vi.name == out.name:
                vi.name = inner
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [out.name], name=f"{out.name}__output"))
    return onnx.ModelProto.FromString(onnx.shape_inference.infer_shapes(model).SerializeToString())


def _box_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute the boxes / batch indices (inputs 1 and 2) of every RoiAlign
    and SEPSNetRoiBlend node, back to the graph inputs (nameless nodes get a name here)."""
    producer = {}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}__{i}"
        for o in node.output:
            producer[o] = node
    todo = [t for n in model.graph.node if n.op_type in BOX_INPUT_OPS for t in n.input[1:3]]
    names: set[str] = set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in names:
            continue
        names.add(node.name)
        todo.extend(t for t in node.input if t)
    return sorted(names)


def _drop_cast_roundtrips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs (the converter casts every fp32 graph input
    to fp16, then back for the nodes kept in fp32): the fp32 consumer then reads the fp32 value itself."""
    def to(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "to"), -1)

    f32 = {v.name for v in list(model.graph.input) + list(model.graph.value_info)
           if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    f32 |= {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    cast16 = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT16 and n.input[0] in f32}
    rename = {n.output[0]: cast16[n.input[0]] for n in model.graph.node
              if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT and n.input[0] in cast16}
    outputs = {o.name for o in model.graph.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    if not rename:
        return model
    kept = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in rename)]
    for n in kept:
        n.input[:] = [rename.get(i, i) for i in n.input]
    used = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and n.output[0] in cast16 and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _drop_stale_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-run shape inference from scratch so no fp32 value_info survives on an fp16 tensor.

    Outputs of custom-domain nodes (``SEPSNetRoiBlend``) keep theirs: ONNX cannot infer them, and the
    nodes after them need a typed input for inference to go on."""
    custom = {o for n in model.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    keep = [v for v in model.graph.value_info if v.name in custom]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return onnx.shape_inference.infer_shapes(model)


def is_fp16_graph(model: onnx.ModelProto) -> bool:
    """True for a graph written by :func:`to_fp16` (it holds fp16 weights)."""
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def count_ops(model: onnx.ModelProto, *ops: str) -> dict[str, int]:
    """How many nodes of each op type (e.g. QuantizeLinear/DequantizeLinear) a graph has."""
    counts = {op: 0 for op in ops}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
