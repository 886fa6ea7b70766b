"""ONNX graph clean-up and checks with onnx-graphsurgeon (DESIGN.md "Facts about the export targets").

- fold constants, drop dead nodes, topologically sort, ``onnx.checker``;
- every ``RoiAlign`` gets ``coordinate_transformation_mode=half_pixel`` (torchvision aligned=True)
  and an explicit ``sampling_ratio`` (the TensorRT parser assumes 1 when it is missing, the ONNX
  spec 0); its batch-index input is int64 as the ONNX spec (and ONNX Runtime) requires;
- dims that must be dynamic are asserted, because ``torch.export`` may silently fall back to a
  static shape.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from sepsnet.errors import EngineError


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:  # pragma: no cover - a hard dependency in pyproject
        raise EngineError(f"onnx-graphsurgeon is required for export: {exc}") from None
    return gs


def fix_roi_align(graph, sampling_ratio: int) -> int:
    """Force half_pixel, an explicit sampling_ratio, int64 batch indices on every RoiAlign node.
    Returns the number of RoiAlign nodes."""
    gs = _gs()
    count = 0
    for node in list(graph.nodes):
        if node.op != "RoiAlign":
            continue
        count += 1
        node.attrs["coordinate_transformation_mode"] = "half_pixel"
        # missing means 0 (adaptive) in ONNX but 1 in the TensorRT parser: write the model's value;
        # a value the exporter did write is kept (assert_roi_align then checks it)
        node.attrs.setdefault("sampling_ratio", int(sampling_ratio))
        node.attrs.setdefault("mode", "avg")
        idx = node.inputs[2]
        if idx.dtype is not None and np.dtype(idx.dtype) != np.int64:
            cast_out = gs.Variable(f"{node.name}_batch_index_i64", dtype=np.int64, shape=idx.shape)
            graph.nodes.append(gs.Node("Cast", name=f"{node.name}_cast_i64", attrs={"to": onnx.TensorProto.INT64},
                                       inputs=[idx], outputs=[cast_out]))
            node.inputs[2] = cast_out
    return count


def clean_graph(model: onnx.ModelProto, sampling_ratio: int = 1, fold: bool = True) -> onnx.ModelProto:
    """Graphsurgeon pass: RoiAlign fix, constant folding, dead-node removal, toposort, checker."""
    gs = _gs()
    graph = gs.import_onnx(model)
    fix_roi_align(graph, sampling_ratio)
    graph.cleanup()
    if fold:
        try:
            graph.fold_constants(error_ok=True)
        except Exception:  # folding is an optimisation; a failure must not break export
            pass
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out, full_check=True)
    return out


def dim_names(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph input name -> dims (int when static, the dim name when dynamic)."""
    init = {i.name for i in model.graph.initializer}
    out: dict[str, list[int | str]] = {}
    for v in model.graph.input:
        if v.name in init:
            continue
        dims = v.type.tensor_type.shape.dim
        out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def assert_dynamic(model: onnx.ModelProto, expected: Mapping[str, Iterable[int]], where: str) -> None:
    """Raise when an input dim that must be dynamic was exported static (torch.export fallback)."""
    dims = dim_names(model)
    for name, axes in expected.items():
        if name not in dims:
            raise EngineError(f"{where}: exported graph has no input {name!r} (inputs: {sorted(dims)})")
        for axis in axes:
            if isinstance(dims[name][axis], int):
                raise EngineError(f"{where}: input {name!r} axis {axis} was exported static ({dims[name]}); "
                                  "torch.export fell back to a static shape, the graph cannot take a variable size")


def assert_static(model: onnx.ModelProto, where: str) -> None:
    """Raise when an input has a dynamic dim (default export is fully static except instances)."""
    for name, dims in dim_names(model).items():
        if any(not isinstance(d, int) for d in dims):
            raise EngineError(f"{where}: input {name!r} has dynamic dims {dims} but a static export was asked")


def roi_align_nodes(model: onnx.ModelProto) -> list[dict[str, object]]:
    """Attributes of every RoiAlign node (for checks and tests)."""
    out = []
    for node in model.graph.node:
        if node.op_type == "RoiAlign":
            out.append({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    return out


def assert_roi_align(model: onnx.ModelProto, sampling_ratio: int, where: str) -> None:
    """Every RoiAlign must be half_pixel with the explicit sampling ratio of the config."""
    for attrs in roi_align_nodes(model):
        mode = attrs.get("coordinate_transformation_mode", b"half_pixel")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "half_pixel" or attrs.get("sampling_ratio") != sampling_ratio:
            raise EngineError(f"{where}: RoiAlign has coordinate_transformation_mode={mode!r}, "
                              f"sampling_ratio={attrs.get('sampling_ratio')!r}; expected half_pixel/{sampling_ratio}")


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save atomically (tmp + replace); graphs here are far below the 2 GB protobuf limit."""
    from sepsnet.fileio import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def assert_constant_topk(model: onnx.ModelProto, where: str) -> int:
    """Every TopK's k must be an initializer (the TensorRT ONNX parser takes no computed k).
    Returns the number of TopK nodes."""
    init = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "TopK":
            continue
        count += 1
        if len(node.input) < 2 or (node.input[1] not in init and node.input[1] not in consts):
            raise EngineError(f"{where}: TopK node {node.name!r} has a computed k ({node.input[1:]}); "
                              "TensorRT needs a constant k")
    return count
