"""TensorRT engine build from the exported ONNX graphs (TensorRT 10 and 11 Python API).

Version handling (DESIGN.md "Facts about the export targets"); each manifest graph entry names the
file for each (see :func:`engine_onnx_for`):
- TensorRT 11: networks are strongly typed, precision builder flags are gone; the precision comes
  from the graph, ``engine_onnx``: ``*.fp16.onnx`` for fp16, ``dense.fp16.int8.onnx`` (Q/DQ of the
  fp16 graph, so unquantized layers run in fp16) for int8, from ``precision.py``.
- TensorRT 10: weakly typed; the graph is ``engine_onnx_trt10``, derived from the fp32 graph: fp16 =
  the ``FP16`` builder flag on the fp32 graph (``dense.onnx`` / ``instance[.plugin].onnx``), int8 =
  the Q/DQ graph of the fp32 graph (``dense.int8.onnx``) with ``INT8`` + ``FP16`` (for the layers
  left unquantized). TensorRT chooses the per-layer precision within those flags.
``tensorrt`` is imported lazily so everything else works on machines without it.
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepsnet.errors import EngineError
from sepsnet.export.engine_guard import EngineTarget, build_target
from sepsnet.export.plugin_rewrite import PLUGIN_OP, PLUGIN_VERSION

NO_TRT_HINT = ("TensorRT engines need the `tensorrt` Python package (TensorRT 10 or 11 for this CUDA version) and "
               "an NVIDIA GPU; the ONNX bundle runs with ONNX Runtime (backend='ort'), and engines can be built later "
               "on the target machine with `sepsnet-export --from-onnx DIR`")
PLUGIN_BUILD_HINT = "build it with `make plugins` (TensorRT SDK installed, TENSORRT_ROOT set) or pass --plugin-lib"

PLUGIN_NAMESPACE = ""
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
_PLUGIN_HANDLES: dict[str, Any] = {}  # resolved library path -> IPluginRegistry.load_library handle


def import_tensorrt(hint: bool = True) -> Any:
    """``import tensorrt`` or an EngineError saying what is missing (``hint``: how to go on). The one
    TensorRT import of the code base (export and runtime)."""
    try:
        import tensorrt as trt  # optional dependency, imported lazily
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        reason = f"cannot import tensorrt ({type(exc).__name__}: {exc})"
        raise EngineError(reason + (f". {NO_TRT_HINT}" if hint else "")) from None
    return trt


def trt_version() -> str | None:
    """TensorRT version string, or None when it cannot be imported."""
    try:
        return str(import_tensorrt().__version__)
    except EngineError:
        return None


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def check_environment(hint: bool = True, device: int | None = None) -> tuple[Any, str]:
    """(tensorrt module, name of the CUDA device that builds) or EngineError naming what is missing."""
    from sepsnet.export.engine_guard import device_info

    trt = import_tensorrt(hint)
    try:
        _, _, name = device_info(device)
    except EngineError as exc:
        raise EngineError(str(exc) + (f". {NO_TRT_HINT}" if hint else "")) from None
    return trt, name


def _plugin_id() -> str:
    return f"{PLUGIN_OP} (version {PLUGIN_VERSION}, namespace {PLUGIN_NAMESPACE!r})"


def load_plugin_library(trt: Any, path: str | Path) -> None:
    """Register the SEPSNetRoiBlend creator of ``path`` with TensorRT, once per library, the way TensorRT
    10/11 load IPluginV3 libraries: ``IPluginRegistry.load_library`` (it calls the library's exported
    ``setLoggerFinder`` and ``getCreators``; the library has no load-time registration, so this is its only
    registration and ``trtexec --dynamicPlugins`` works the same way). A creator already registered
    (e.g. the application loaded the library itself) is used as is. EngineError naming library and op."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"plugin library for {_plugin_id()} not found: {path}; {PLUGIN_BUILD_HINT}")
    key = str(path.resolve())
    registry = trt.get_plugin_registry()
    if key in _PLUGIN_HANDLES or has_plugin_creator(registry, PLUGIN_OP):
        return
    if not hasattr(registry, "load_library"):
        raise EngineError(f"TensorRT {getattr(trt, '__version__', '?')} has no IPluginRegistry.load_library; "
                          f"sepsnet needs TensorRT 10 or 11 to load {path} ({_plugin_id()})")
    try:
        handle = registry.load_library(key)
    except Exception as exc:
        raise EngineError(f"cannot load plugin library {path} (for {_plugin_id()}): {exc}") from None
    if not has_plugin_creator(registry, PLUGIN_OP):
        raise EngineError(f"plugin {_plugin_id()} not found: {path} loaded but registered no creator for it "
                          f"(built against another TensorRT version, or from other sources? this is TensorRT "
                          f"{getattr(trt, '__version__', '?')}); {PLUGIN_BUILD_HINT}")
    _PLUGIN_HANDLES[key] = handle


def has_plugin_creator(registry: Any, name: str, version: str = PLUGIN_VERSION,
                       namespace: str = PLUGIN_NAMESPACE) -> bool:
    """Whether ``registry`` holds a creator for (name, version, namespace).

    ``IPluginRegistry.get_creator`` (TensorRT 10/11; None when absent) is the API; the listing of
    ``all_creators`` / ``plugin_creator_list`` is the fallback for registries without it."""
    for getter in ("get_creator", "get_plugin_creator"):  # TensorRT 10/11; the IPluginV2-era name
        get = getattr(registry, getter, None)
        if get is not None:
            try:
                if get(name, version, namespace) is not None:
                    return True
            except Exception:
                pass
    creators = getattr(registry, "all_creators", None)
    if creators is None:
        creators = getattr(registry, "plugin_creator_list", None) or []
    return any(getattr(c, "name", None) == name and str(getattr(c, "plugin_version", version)) == version
               for c in creators)


def engine_onnx_for(graph: dict[str, Any], major: int) -> str:
    """The graph file of a manifest graph entry that TensorRT ``major`` builds (module docstring)."""
    if major < 11:
        return str(graph.get("engine_onnx_trt10") or graph["engine_onnx"])
    return str(graph["engine_onnx"])


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "unknown"


def default_timing_cache(trt_version: str, gpu: str, root: str | Path | None = None) -> Path:
    """``~/.cache/sepsnet/trt_timing_<TensorRT version>_<GPU name>.cache`` (names sanitised): a timing
    cache holds tactics of one TensorRT version on one GPU, so each pair gets its own file."""
    base = Path(root) if root is not None else Path.home() / ".cache" / "sepsnet"
    return base / f"trt_timing_{_sanitise(trt_version)}_{_sanitise(gpu)}.cache"


def attach_timing_cache(config: Any, path: Path, log: Callable[[str], None] = print) -> Any:
    """Give the builder ``config`` the timing cache read from ``path`` (fresh when absent). A cache
    that TensorRT refuses (written by another TensorRT version or GPU, or corrupt) is replaced by a
    fresh one with a warning; the file is overwritten after the build."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as exc:
        cache, reason = None, f"{type(exc).__name__}: {exc}"
    else:
        reason = "TensorRT refused it"
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if blob:
        msg = (f"timing cache {path} does not match this TensorRT version / GPU ({reason}); "
               "starting a fresh one, the file will be overwritten")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(f"warning: {msg}")
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT refused an empty timing cache")
    return cache


@dataclass
class BuildResult:
    plan: Path
    seconds: float
    target: EngineTarget  # what the plan needs (the manifest ``engine`` block)
    precision: str


def apply_compatibility(trt: Any, config: Any, target: EngineTarget, plugin_library: str | Path | None,
                        parser: Any = None) -> None:
    """Hardware- / version-compatible build settings on the builder ``config`` (TensorRT >= 8.6 API:
    ``hardware_compatibility_level``, ``BuilderFlag.VERSION_COMPATIBLE``, ``plugins_to_serialize``);
    EngineError when this TensorRT does not offer the one asked for. A version-compatible plan carries
    the plugin libraries it uses: ours and those the ONNX parser used (``get_used_vc_plugin_libraries``,
    e.g. for RoiAlign)."""
    if target.hardware_compatibility == "ampere_plus":
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), "AMPERE_PLUS", None)
        if level is None or not hasattr(config, "hardware_compatibility_level"):
            raise EngineError(f"TensorRT {trt.__version__} offers no hardware-compatible (Ampere+) builds; "
                              "build without --hardware-compatible")
        config.hardware_compatibility_level = level
    if target.version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise EngineError(f"TensorRT {trt.__version__} offers no version-compatible builds; "
                              "build without --version-compatible")
        config.set_flag(flag)
        libraries = [str(plugin_library)] if plugin_library is not None else []
        used = getattr(parser, "get_used_vc_plugin_libraries", None)
        libraries += [str(lib) for lib in (used() if used is not None else []) if str(lib) not in libraries]
        if libraries and hasattr(config, "plugins_to_serialize"):
            config.plugins_to_serialize = libraries  # the plan carries them for later runtimes


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any, strongly_typed: bool,
           plugin_library: str | Path | None = None) -> tuple[Any, Any]:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines, plugin = [], False
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else f"#{err.node()}"
            op = err.node_operator() if hasattr(err, "node_operator") else "?"
            plugin = plugin or op == PLUGIN_OP or PLUGIN_OP in str(err.desc())
            lines.append(f"  node {node!r} ({op}): {err.desc()}")
        if plugin:
            where = (f"the plugin library loaded was {plugin_library}" if plugin_library is not None else
                     "no plugin library was loaded (pass --plugin-lib / plugin_library)")
            lines.append(f"  plugin {_plugin_id()}: {where}")
        raise EngineError(f"TensorRT ONNX parser rejected {onnx_path}:\n" + "\n".join(lines or ["  (no detail)"]))
    return network, parser


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, precision: str = "fp32",
                 profiles: dict[str, ShapeRange] | None = None, workspace_gib: float = 4.0,
                 timing_cache: str | Path | None = None, plugin_library: str | Path | None = None,
                 hardware_compatible: bool = False, version_compatible: bool = False,
                 log: Callable[[str], None] = print) -> BuildResult:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path`` (on torch's current CUDA device).

    ``precision`` is the bundle precision (fp32/fp16/int8): on TensorRT 10 it sets the builder flags,
    on 11 it is only reported (the graph carries it); pass the graph :func:`engine_onnx_for` picks.
    ``profiles`` maps every dynamic input to (min, opt, max) shapes (one optimisation profile). The
    timing cache file (the CLI passes :func:`default_timing_cache`) is read when present and written
    back after the build so later builds reuse the tactics; a mismatching one is replaced with a warning.
    ``hardware_compatible`` (Ampere+ level) / ``version_compatible``: see :mod:`engine_guard`; the
    returned :class:`BuildResult` ``target`` records them with the TensorRT version and compute capability.
    """
    from sepsnet.fileio import atomic_write_bytes

    trt = import_tensorrt()
    major = trt_major(trt)
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old; sepsnet supports TensorRT 10 and 11")
    target = build_target(str(trt.__version__), None, hardware_compatible, version_compatible)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ROIAlign_TRT lives in libnvinfer_plugin
    if plugin_library is not None:
        load_plugin_library(trt, plugin_library)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11  # 11: always strongly typed (flag kept where it still exists)
    network, parser = _parse(trt, builder, Path(onnx_path), logger, strongly_typed, plugin_library)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if major < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ graph: explicit scales, no calibrator
    apply_compatibility(trt, config, target, plugin_library, parser)
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
    if timing_cache is not None:
        attach_timing_cache(config, Path(timing_cache), log)
    start = time.perf_counter()
    log(f"building TensorRT {trt.__version__} engine ({precision}) from {onnx_path} on {target.gpu} "
        f"(compute capability {target.compute_capability}, hardware compatibility {target.hardware_compatibility}"
        f"{', version-compatible' if target.version_compatible else ''}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan_path, bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"wrote {plan_path} in {seconds:.1f} s")
    return BuildResult(plan=Path(plan_path), seconds=seconds, target=target, precision=precision)


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
