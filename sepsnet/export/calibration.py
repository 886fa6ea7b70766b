"""int8 calibration: the frames, the range estimator, the Q/DQ graph (DESIGN.md "Facts about the export targets").

Explicit quantization: QuantizeLinear/DequantizeLinear pairs written by
``onnxruntime.quantization.quantize_static(QuantFormat.QDQ)``, calibrated with ONNX Runtime. Why this and
not a TensorRT INT8 calibrator: implicit calibrators are removed in TensorRT 11, while Q/DQ graphs are
consumed by TensorRT 10 and 11 alike; ORT's quantizer is already a dependency and runs on CPU. The settings
follow what TensorRT accepts: symmetric int8 (zero point 0), per-channel weights, fp32 biases. Only the
dense graph (backbone/FPN/heads: nearly all FLOPs) is quantized.

Calibration frames must look like what the engine will see, so:

- they come from real images: a folder, or the train split of a dataset root
  (:func:`calibration_images`); int8 without them is refused (:func:`require_source`), except for an
  explicit ``synthetic`` source (generated shapes, for smoke tests only);
- they are preprocessed by the predictor's own function, ``sepsnet.data.transforms.prepare_input``
  (one resize policy: evaluation resize, shrink-to-fit and zero padding for a static input size);
- the range estimator is selectable: ``minmax`` (largest absolute value), ``percentile`` (clips the
  outliers: the 99.999th percentile of |x|) or ``entropy`` (the KL-divergence threshold of TensorRT's
  entropy calibrator: a 2048-bin histogram of |x| folded onto 128 quantized bins, computed by ORT's
  ``EntropyCalibrater``; ``quantize_static`` alone would build it with 128 bins, which cannot clip, so the
  ranges are computed here and handed to it as a calibration cache, :func:`entropy_ranges`).

The TensorRT 11 graph is Q/DQ over the fp16 graph (strongly typed: unquantized layers run in fp16),
with fp16 scales, at opset 19 (the first where Q/DQ take fp16 scales). Its quantized convolutions carry
their bias as a separate fp16 ``Add`` (:func:`split_fp16_biases`): a runtime that folds a float bias into
the int8 convolution computes ``bias / (activation scale x weight scale)`` and rounds it to int32; in the
graph's fp16 that quotient overflows (65504) for the FCOS classification prior bias (-4.6 over a scale
near 1e-5), and ONNX Runtime's ``WeightBiasQuantization`` turned it into a bias of about -3e4: every
class score of that graph was wrong (README "int8 accuracy").
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sepsnet.config import DataConfig
from sepsnet.errors import ConfigError, DataError, EngineError
from sepsnet.export import surgery

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"
SYNTHETIC = "synthetic"
ENTROPY_BINS = 2048  # TensorRT's entropy calibration: |x| histogram of 2048 bins ...
ENTROPY_QUANTIZED_BINS = 128  # ... and thresholds tried on the 128 bins an int8 half-range has
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take fp16 scales from opset 19
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
HOW_TO_CALIBRATE = ("pass --calib DIR: a folder of images like the deployment frames, or a dataset root "
                    "(COCO panoptic or Cityscapes layout) whose train split is used, e.g. the data the model was "
                    "trained on; `--calib synthetic` calibrates on generated shapes, for smoke tests only "
                    "(the int8 accuracy is then meaningless)")


def require_source(calib: str | Path | None) -> str | Path:
    """The calibration source, or ConfigError saying how to give one (int8 never calibrates silently
    on generated frames)."""
    if calib is None or str(calib).strip() == "":
        raise ConfigError(f"--int8 needs real calibration images: {HOW_TO_CALIBRATE}")
    return calib


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def source_files(source: str | Path, split: str = "train") -> list[Path]:
    """Image files of a calibration source: the ``split`` folder of a dataset root (COCO panoptic layout
    ``root/annotations`` + ``root/<split>/``; Cityscapes ``root/leftImg8bit/<split>/``), else every image
    under the folder. DataError naming the folder when there is none."""
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"calibration folder {root} does not exist (expected a folder of images or a dataset root)")
    for candidate in (root / "leftImg8bit" / split, root / split):
        if (root / "annotations").is_dir() or candidate.parent.name == "leftImg8bit":
            if candidate.is_dir():
                files = _image_files(candidate)
                if files:
                    return files
    files = _image_files(root)
    if not files:
        raise DataError(f"calibration folder {root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def spread(files: Sequence[Path], count: int) -> list[Path]:
    """``count`` files evenly spaced over the sorted list (covers the whole set, deterministic)."""
    if count <= 0:
        raise ConfigError(f"--calib-count must be positive, got {count}")
    if len(files) <= count:
        return list(files)
    idx = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in idx]


def generated_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A synthetic RGB uint8 frame: gradient background + random filled shapes (smoke tests only)."""
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


def calibration_images(source: str | Path, count: int, frame_hw: tuple[int, int],
                       split: str = "train", seed: int = 0) -> Iterator[np.ndarray]:
    """HxWx3 uint8 RGB frames of ``source`` (:func:`source_files`, ``count`` spread over it), or ``count``
    generated ``frame_hw`` frames for ``source == "synthetic"``."""
    from sepsnet.data.coco_panoptic import read_rgb

    if str(source) == SYNTHETIC:
        rng = np.random.default_rng(seed)
        for _ in range(count):
            yield generated_frame(rng, *frame_hw)
        return
    for path in spread(source_files(source, split), count):
        yield read_rgb(path)  # DataError naming an undecodable file


def calibration_inputs(source: str | Path, data: DataConfig, input_hw: tuple[int, int] | None,
                       count: int = 32, split: str = "train", seed: int = 0) -> list[np.ndarray]:
    """``count`` network inputs (1, 3, H, W) float32 for calibration, preprocessed exactly as
    ``PanopticPredictor`` does (``prepare_input``: one resize policy). ``input_hw``: the static input
    size of the bundle, None for a dynamic one (inputs then have the padded size of each frame)."""
    from sepsnet.data.transforms import prepare_input
    from sepsnet.export.onnx_export import ceil32

    frame_hw = input_hw or (ceil32(data.min_size_test), ceil32(data.max_size_test))
    return [prepare_input(img, data, input_hw)[0].numpy()
            for img in calibration_images(source, count, frame_hw, split, seed)]


class _Reader:
    """onnxruntime CalibrationDataReader over prepared inputs."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self.name = name
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return None if nxt is None else {self.name: nxt}


def _ort_method(method: str) -> tuple[Any, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "percentile":
        return CalibrationMethod.Percentile, {"CalibPercentile": 99.999}
    if method == "entropy":
        return CalibrationMethod.Entropy, {}
    return CalibrationMethod.MinMax, {}


def entropy_ranges(model: Path, reader: Any, cache: Path) -> Path:
    """Per-tensor ranges by the KL-divergence threshold on ``ENTROPY_BINS`` histogram bins (symmetric,
    over |x|), saved as an ONNX Runtime calibration cache (``cache``) for ``quantize_static``."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        from onnxruntime import __version__ as ort_version

        raise ConfigError("--calib-method entropy needs an onnxruntime whose quantize_static takes calibration caches "
                          f"(this one is {ort_version}); upgrade it or use --calib-method minmax|percentile")
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model, QUANTIZED_OPS, augmented_model_path=str(cache.with_name("entropy_augmented.onnx")),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS, "symmetric": True})
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    for data in ranges.values():  # numpy scalars lose their dtype (fp16 graphs) in the cache; 0-d arrays keep it
        for attr in ("lowest", "highest"):
            if isinstance(getattr(data, attr, None), np.generic):
                setattr(data, attr, np.asarray(getattr(data, attr)))
    save_tensors_data(ranges, cache)
    return cache


def to_int8_qdq(src: str | Path, dst: str | Path, batches: Sequence[np.ndarray], input_name: str = "image",
                method: str = "minmax") -> onnx.ModelProto:
    """Insert Q/DQ nodes calibrated on ``batches`` (ORT quantize_static, QDQ format); saves ``dst``.

    ``src`` is the fp32 graph or the fp16 graph of ``precision.to_fp16``; ``method`` one of ``METHODS``.
    The fp16 one is moved to opset ``QDQ_FP16_OPSET`` first (ORT writes fp16 scales there), skips ORT's
    graph optimisation in pre-processing (it would bake CPU-only fp16 -> fp32 casts into the weights),
    and gets its quantized convolutions' biases split off (:func:`split_fp16_biases`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sepsnet.export.precision import is_fp16_graph

    if not batches:
        raise DataError("int8 calibration needs at least one frame")
    calibrate_method, calib_options = _ort_method(method)
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
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, **calib_options}
        reader, cache = _Reader(input_name, batches), None
        try:
            if method == "entropy":
                cache, reader = entropy_ranges(pre, reader, Path(tmp) / "entropy_ranges.json"), None
            quantize_static(
                str(pre), str(out_tmp), reader,
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, calibrate_method=calibrate_method, extra_options=extra,
                **({"calibration_cache_path": str(cache)} if cache else {}),
            )
        except ConfigError:
            raise
        except Exception as exc:
            raise EngineError(f"int8 Q/DQ quantization of {src} failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(out_tmp))
    if fp16:
        model = split_fp16_biases(model)
    onnx.checker.check_model(model)
    surgery.save(model, dst)
    return model


def split_fp16_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every quantized Conv (weights from a DequantizeLinear) with an fp16 bias ``b`` becomes
    ``Conv(x, w)`` + ``Add(b reshaped to (1, C, 1, ...))``, same output name.

    Why: the int8 convolution's bias must stay a float added after the int32 accumulation. A runtime
    that instead quantizes it to int32 at scale ``s_x * s_w`` (ONNX Runtime's ``WeightBiasQuantization``
    does this for every DequantizeLinear -> Conv with a float bias) computes ``b / (s_x * s_w)`` in the
    bias's type; in fp16 that overflows past 65504 (e.g. the classification prior -4.6 at a scale of
    1e-5) and the bias becomes garbage. A separate Add is exact in fp16, and TensorRT fuses a constant
    Add into the convolution's epilogue anyway."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        bias = inits.get(node.input[2])
        weight_src = producer.get(node.input[1])
        if bias is None or bias.data_type != onnx.TensorProto.FLOAT16 or weight_src is None \
                or weight_src.op_type != "DequantizeLinear":
            continue
        weight = inits.get(weight_src.input[0])
        kernel_rank = len(weight.dims) - 2 if weight is not None else 2
        values = numpy_helper.to_array(bias)
        shaped = numpy_helper.from_array(values.reshape((1, -1) + (1,) * kernel_rank), f"{node.name}__bias")
        model.graph.initializer.append(shaped)
        out = node.output[0]
        node.output[0] = f"{out}__nobias"
        del node.input[2]
        nodes.append(onnx.helper.make_node("Add", [node.output[0], shaped.name], [out], name=f"{node.name}__bias_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for i in unused:
        model.graph.initializer.remove(i)
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


def write_int8_dense_graphs(out: str | Path, batches: Sequence[np.ndarray], method: str = "minmax",
                            dense: str = "dense.onnx") -> dict[str, onnx.ModelProto]:
    """From ``out/dense.onnx`` write both int8 engine graphs, calibrated on the same ``batches``:
    ``dense.int8.onnx`` (TensorRT 10: Q/DQ over fp32) and ``dense.fp16.int8.onnx`` (TensorRT 11: Q/DQ
    over the fp16 graph, fp16 scales). Returns ``{file name: graph}``."""
    from sepsnet.export import precision

    out = Path(out)
    graphs = {"dense.int8.onnx": to_int8_qdq(out / dense, out / "dense.int8.onnx", batches, method=method)}
    with tempfile.TemporaryDirectory(dir=out, prefix=".fp16-") as tmp:
        precision.to_fp16(out / dense, Path(tmp) / "dense.fp16.onnx")
        graphs["dense.fp16.int8.onnx"] = to_int8_qdq(Path(tmp) / "dense.fp16.onnx", out / "dense.fp16.int8.onnx",
                                                     batches, method=method)
    return graphs
