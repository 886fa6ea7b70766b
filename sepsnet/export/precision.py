"""Reduced-precision ONNX graphs for TensorRT (DESIGN.md "Facts about the export targets").

TensorRT 11 networks are always strongly typed: the precision lives in the graph, not in builder
flags. So fp16 and int8 are produced here, as ONNX, where ONNX Runtime can test them on CPU:

- fp16: ``onnxconverter_common.float16`` with fp32 inputs/outputs and the numerically sensitive
  ops kept in fp32 (RoiAlign, Resize, Softmax, reductions, Exp/Sqrt/Log; see ``FP32_OPS``). The
  ``SEPSNetRoiBlend`` plugin node stays fp32 too (all-fp32 is one of its supported type combos),
  and so does the box path: every node computing the boxes / batch indices of a RoiAlign or of
  the plugin (from ``rois``) keeps fp32, so box coordinates are never rounded to fp16.
- int8: explicit quantization, i.e. QuantizeLinear/DequantizeLinear pairs written by
  ``onnxruntime.quantization.quantize_static(QuantFormat.QDQ)``, calibrated with ONNX Runtime on
  a folder of images or on generated frames. Why this and not an INT8 calibrator: implicit
  calibrators are removed in TensorRT 11, while Q/DQ graphs are consumed by TensorRT 10 and 11
  alike; ORT's quantizer is already a dependency and runs on CPU (NVIDIA ModelOpt does the same
  with more options, at the cost of another heavy dependency). The settings follow what
  TensorRT accepts: symmetric int8 (zero point 0), per-channel weights, fp32 biases.
  Only the dense graph (backbone/FPN/heads: nearly all FLOPs) is quantized; the small instance
  graph (RoiAlign + blend + confidence head) stays fp32. ``to_int8_qdq`` accepts the fp32 graph
  (TensorRT 10: built weakly typed with the INT8 + FP16 flags, so unquantized layers may run in
  fp16) or the fp16 graph (TensorRT 11, strongly typed: the layers left unquantized run in fp16
  because the graph says so; its Q/DQ scales are fp16, so that graph is moved to opset 19, the
  first where QuantizeLinear/DequantizeLinear take fp16 scales).
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from sepsnet.errors import DataError, EngineError
from sepsnet.export import surgery
from sepsnet.export.plugin_rewrite import PLUGIN_OP

FP32_OPS = ("RoiAlign", "Resize", "Softmax", "ReduceSum", "ReduceMean", "ReduceMax", "Exp", "Sqrt", "Log",
            "TopK", "NonMaxSuppression", "Range", "CumSum", PLUGIN_OP)
BOX_INPUT_OPS = ("RoiAlign", PLUGIN_OP)  # inputs 1, 2 (boxes, batch indices) are computed in fp32
QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take fp16 scales from opset 19
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


# ---------------------------------------------------------------- calibration frames
def letterbox(image_rgb: np.ndarray, height: int, width: int, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
    """Resize keeping aspect to fit (H, W), normalise (0..255 scale), zero-pad bottom/right -> (3,H,W)."""
    import cv2

    h, w = image_rgb.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    resized = cv2.resize(image_rgb, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    resized = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = np.zeros((height, width, 3), np.float32)
    out[:nh, :nw] = resized
    return out.transpose(2, 0, 1).copy()


def generated_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A synthetic RGB uint8 frame: gradient background + random filled shapes (calibration only)."""
    import cv2

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    grad = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    img = np.clip(base + grad * (xs[..., None] + ys[..., None]) * 0.5, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(4, min(height, width) // 16), max(8, min(height, width) // 3)))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, color, -1)
        else:
            cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), color, -1)
    return img


def calibration_batches(height: int, width: int, batch: int, mean: Sequence[float], std: Sequence[float],
                        folder: str | Path | None = None, count: int = 32,
                        seed: int = 0) -> list[np.ndarray]:
    """``count`` normalised frames (from ``folder`` images, else generated) grouped in batches."""
    import cv2

    frames: list[np.ndarray] = []
    if folder is not None:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DataError(f"calibration folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for p in files[:count]:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DataError(f"calibration image {p} cannot be decoded")
            frames.append(letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), height, width, mean, std))
    else:
        rng = np.random.default_rng(seed)
        frames = [letterbox(generated_frame(rng, height, width), height, width, mean, std) for _ in range(count)]
    while len(frames) % batch:
        frames.append(frames[len(frames) % max(1, len(frames))])
    return [np.stack(frames[i:i + batch]) for i in range(0, len(frames), batch)]


class _Reader:
    """onnxruntime CalibrationDataReader over prepared batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name = name
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return None if nxt is None else {self.name: nxt}


def is_fp16_graph(model: onnx.ModelProto) -> bool:
    """True for a graph written by :func:`to_fp16` (it holds fp16 weights)."""
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def to_int8_qdq(src: str | Path, dst: str | Path, batches: list[np.ndarray],
                input_name: str = "image", percentile: bool = False) -> onnx.ModelProto:
    """Insert Q/DQ nodes calibrated on ``batches`` (ORT quantize_static, QDQ format); saves ``dst``.

    ``src`` is the fp32 graph or the fp16 graph of :func:`to_fp16`. The fp16 one is moved to opset
    ``QDQ_FP16_OPSET`` first (ORT writes fp16 scales there) and skips ORT's graph optimisation in
    pre-processing, which would otherwise bake CPU-only fp16 -> fp32 casts into the weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not batches:
        raise DataError("int8 calibration needs at least one frame")
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        fp16 = is_fp16_graph(onnx.load(str(src), load_external_data=False))
        if fp16:
            src = _upgrade_opset(Path(src), Path(tmp) / "opset.onnx", QDQ_FP16_OPSET)
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=fp16)
        except Exception:  # pre-processing only helps the quantizer; fall back to the raw graph
            pre = Path(src)
        out_tmp = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                str(pre), str(out_tmp), _Reader(input_name, batches),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul"],
                calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
        except Exception as exc:
            raise EngineError(f"int8 Q/DQ quantization of {src} failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(out_tmp))
    onnx.checker.check_model(model)
    surgery.save(model, dst)
    return model


def _upgrade_opset(src: Path, dst: Path, opset: int) -> Path:
    """``src`` converted to at least ``opset`` of the default domain (onnx.version_converter), saved at ``dst``."""
    from onnx import version_converter

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return src
    try:
        model = version_converter.convert_version(model, opset)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise EngineError(f"int8 Q/DQ of the fp16 graph {src.name} needs opset {opset} (fp16 scales); "
                          f"converting it from opset {current} failed: {type(exc).__name__}: {exc}") from exc
    onnx.save(model, str(dst))
    return dst


def count_ops(model: onnx.ModelProto, *ops: str) -> dict[str, int]:
    """How many nodes of each op type (e.g. QuantizeLinear/DequantizeLinear) a graph has."""
    counts = {op: 0 for op in ops}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
