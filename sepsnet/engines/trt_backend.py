"""TensorRT 10/11 backend: deserialize a ``.plan``, bind named tensors to torch CUDA memory
and run ``execute_async_v3`` on the current torch stream. No pycuda: torch owns the memory.

Cannot run on machines without TensorRT and an NVIDIA GPU; every entry point raises
:class:`EngineError` there, naming what is missing.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from sepsnet.engines.backend import TensorSpec
from sepsnet.errors import EngineError

_PLUGINS_LOADED: set[str] = set()


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415 (lazy: optional dependency)
    except Exception as exc:
        raise EngineError(f"TensorRT is not available ({type(exc).__name__}: {exc}); install TensorRT 10/11 "
                          "for this CUDA version, or run the bundle with backend='ort'") from None
    return trt


def tensorrt_version() -> Optional[str]:
    try:
        return import_tensorrt().__version__
    except EngineError:
        return None


def load_plugin_library(path: Union[str, Path]) -> None:
    """dlopen the plugin library once so its creators register before deserialisation."""
    path = str(Path(path).resolve())
    if path in _PLUGINS_LOADED:
        return
    if not Path(path).is_file():
        raise EngineError(f"TensorRT plugin library not found: {path}")
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise EngineError(f"cannot load TensorRT plugin library {path}: {exc}") from None
    _PLUGINS_LOADED.add(path)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    return table[dtype]


class TrtBackend:
    """One engine. Inputs are converted to the engine's dtypes on the GPU; outputs are new
    torch CUDA tensors shaped from the context after ``set_input_shape``."""

    def __init__(self, plan_path: Union[str, Path], plugin_library: Optional[Union[str, Path]] = None,
                 device: int = 0) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines need an NVIDIA GPU, and torch sees none")
        if plugin_library:
            load_plugin_library(plugin_library)
        path = Path(plan_path)
        if not path.is_file():
            raise EngineError(f"TensorRT plan not found: {path}")
        self.trt = trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")  # ROIAlign_TRT and friends
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the plan (built with another TensorRT "
                              "version or GPU, or a plugin library is missing)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.name = f"tensorrt-{trt.__version__}"
        self.path = path

    def _spec(self, name: str) -> TensorSpec:
        shape = tuple(int(d) if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(name))
        return TensorSpec(name, shape, str(_torch_dtype(self.trt, self.engine.get_tensor_dtype(name))).replace("torch.", ""))

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [self._spec(n) for n in self._inputs]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [self._spec(n) for n in self._outputs]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []
        for name in self._inputs:
            if name not in feeds:
                raise EngineError(f"{self.path.name}: missing input {name!r}")
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            t = feeds[name].to(self.device, dtype).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"{self.path.name}: input {name!r} shape {tuple(t.shape)} is outside the "
                                  "engine's optimisation profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device=self.device)
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.path.name}: execute_async_v3 failed")
        return {k: v.float() if v.dtype == torch.float16 else v for k, v in outputs.items()}
