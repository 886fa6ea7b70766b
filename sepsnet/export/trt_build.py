"""TensorRT engine build from the exported ONNX graphs (TensorRT 10 and 11 Python API).

Version handling (DESIGN.md "Facts about the export targets"):
- TensorRT 11: networks are strongly typed, precision builder flags are gone; the precision comes
  from the graph (``dense.fp16.onnx`` / Q/DQ ``dense.int8.onnx`` from ``precision.py``).
- TensorRT 10: weakly typed by default; fp16 = the ``FP16`` builder flag on the fp32 graph,
  int8 = the Q/DQ graph with ``INT8`` (+ ``FP16`` for the layers left unquantized).
``tensorrt`` is imported lazily so everything else works on machines without it.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from sepsnet.errors import EngineError

NO_TRT_HINT = ("TensorRT engines need the `tensorrt` Python package (pip install tensorrt) and an NVIDIA GPU; "
               "the ONNX bundle is usable with ONNX Runtime now, and engines can be built later on the target "
               "machine with `sepsnet-export --from-onnx DIR --fp16`")

PLUGIN_OP = "SEPSNetRoiBlend"
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def import_tensorrt(hint: bool = True) -> Any:
    """``import tensorrt`` or an EngineError saying what is missing (``hint``: how to go on)."""
    try:
        import tensorrt as trt  # noqa: WPS433 - optional dependency
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        reason = f"cannot import tensorrt ({type(exc).__name__}: {exc})"
        raise EngineError(reason + (f". {NO_TRT_HINT}" if hint else "")) from None
    return trt


def trt_version() -> Optional[str]:
    """TensorRT version string, or None when it cannot be imported."""
    try:
        return str(import_tensorrt().__version__)
    except EngineError:
        return None


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_name(hint: bool = True) -> str:
    """Name of CUDA device 0, or EngineError when there is no NVIDIA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU visible to PyTorch" + (f". {NO_TRT_HINT}" if hint else ""))
    return torch.cuda.get_device_name(0)


def check_environment(hint: bool = True) -> tuple[Any, str]:
    """(tensorrt module, GPU name) or EngineError naming what is missing."""
    trt = import_tensorrt(hint)
    return trt, gpu_name(hint)


def load_plugin_library(trt: Any, path: Union[str, Path], logger: Any) -> None:
    """Load the SEPSNetRoiBlend plugin library so the parser and runtime find its creator."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"plugin library not found: {path} (build it with `make plugins` where a TensorRT SDK "
                          "is installed, TENSORRT_ROOT set)")
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # static REGISTER_TENSORRT_PLUGIN registration
    except OSError as exc:
        raise EngineError(f"cannot load plugin library {path}: {exc}") from None
    registry = trt.get_plugin_registry()
    if not _has_creator(registry, PLUGIN_OP) and hasattr(registry, "load_library"):
        registry.load_library(str(path))  # libraries exporting getCreators()
    if not _has_creator(registry, PLUGIN_OP):
        raise EngineError(f"{path} loaded but no {PLUGIN_OP} plugin creator was registered "
                          f"(built against another TensorRT version? this is TensorRT {trt.__version__})")


def _has_creator(registry: Any, name: str) -> bool:
    creators = getattr(registry, "all_creators", None)
    if creators is None:
        creators = getattr(registry, "plugin_creator_list", [])
    return any(getattr(c, "name", None) == name for c in creators)


@dataclass
class BuildResult:
    plan: Path
    seconds: float
    trt_version: str
    gpu: str
    precision: str


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any, strongly_typed: bool) -> tuple[Any, Any]:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else f"#{err.node()}"
            op = err.node_operator() if hasattr(err, "node_operator") else "?"
            lines.append(f"  node {node!r} ({op}): {err.desc()}")
        raise EngineError(f"TensorRT ONNX parser rejected {onnx_path}:\n" + "\n".join(lines or ["  (no detail)"]))
    return network, parser


def build_engine(onnx_path: Union[str, Path], plan_path: Union[str, Path], *, precision: str = "fp32",
                 profiles: Optional[dict[str, ShapeRange]] = None, workspace_gib: float = 4.0,
                 timing_cache: Optional[Union[str, Path]] = None, plugin_library: Optional[Union[str, Path]] = None,
                 log: Callable[[str], None] = print) -> BuildResult:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path``.

    ``precision`` is the precision the ONNX graph was prepared for (fp32/fp16/int8); ``profiles`` maps
    every dynamic input to (min, opt, max) shapes (one optimisation profile). The timing cache file is
    read when present and written back after the build so later builds reuse the tactics.
    """
    from sepsnet.fileio import atomic_write_bytes

    trt, gpu = check_environment()
    major = trt_major(trt)
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old; sepsnet supports TensorRT 10 and 11")
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ROIAlign_TRT lives in libnvinfer_plugin
    if plugin_library is not None:
        load_plugin_library(trt, plugin_library, logger)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11  # 11: always strongly typed (flag kept where it still exists)
    network, _parser = _parse(trt, builder, Path(onnx_path), logger, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if major < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ graph: explicit scales, no calibrator
    dynamic_inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic_inputs.append(tensor.name)
    if dynamic_inputs:
        profiles = profiles or {}
        missing = [n for n in dynamic_inputs if n not in profiles]
        if missing:
            raise EngineError(f"{onnx_path}: dynamic inputs {missing} have no optimisation profile range")
        profile = builder.create_optimization_profile()
        for name in dynamic_inputs:
            lo, opt, hi = profiles[name]
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache_path = Path(timing_cache)
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    log(f"building TensorRT {trt.__version__} engine ({precision}) from {onnx_path} on {gpu} ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"wrote {plan_path} in {seconds:.1f} s")
    return BuildResult(plan=Path(plan_path), seconds=seconds, trt_version=str(trt.__version__), gpu=gpu,
                       precision=precision)


def dense_profiles(ranges: dict[str, list[int]]) -> dict[str, ShapeRange]:
    """Profile of ``image`` from the manifest ranges {batch,height,width: [min,opt,max]}."""
    b, h, w = ranges["batch"], ranges["height"], ranges["width"]
    return {"image": tuple((b[i], 3, h[i], w[i]) for i in range(3))}  # type: ignore[return-value]


def instance_profiles(ranges: dict[str, list[int]], instances: dict[str, int], attn_dim: int,
                      bases_channels: int, p3_channels: int) -> dict[str, ShapeRange]:
    """Profiles of the instance graph: instances min..max (the runtime skips the engine when n == 0)."""
    b, h, w = ranges["batch"], ranges["height"], ranges["width"]
    n = (max(1, instances["min"]), max(1, instances["opt"]), max(1, instances["max"]))
    return {
        "rois": tuple((n[i], 5) for i in range(3)),  # type: ignore[dict-item]
        "attention": tuple((n[i], attn_dim) for i in range(3)),  # type: ignore[dict-item]
        "bases": tuple((b[i], bases_channels, h[i] // 4, w[i] // 4) for i in range(3)),  # type: ignore[dict-item]
        "p3": tuple((b[i], p3_channels, h[i] // 8, w[i] // 8) for i in range(3)),  # type: ignore[dict-item]
    }
