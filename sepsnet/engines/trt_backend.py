"""TensorRT 10/11 backend: deserialize a ``.plan``, bind named tensors to torch CUDA memory
and run ``execute_async_v3`` on the current torch stream. No pycuda: torch owns the memory.

Cannot run on machines without TensorRT and an NVIDIA GPU; every entry point raises
:class:`EngineError` there, naming what is missing. Both static and dynamic engines enqueue on the
backend's own CUDA stream, ordered against the caller's current stream with events (``wait_stream``).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sepsnet.engines.backend import TensorSpec
from sepsnet.errors import EngineError


def import_tensorrt() -> Any:
    """The one TensorRT import (:func:`sepsnet.export.trt_build.import_tensorrt`)."""
    from sepsnet.export.trt_build import import_tensorrt as _import

    return _import()


def tensorrt_version() -> str | None:
    from sepsnet.export.trt_build import trt_version

    return trt_version()


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    return table[dtype]


class TrtBackend:
    """One engine. Inputs are converted to the engine's dtypes on the GPU.

    Static-shape engines (the default dense export) get their I/O tensors allocated once and the
    context bound to them, so a camera loop allocates nothing per frame but the returned copies;
    with ``cuda_graph=True`` their launch is also captured once into a CUDA graph and replayed
    (less CPU launch overhead). Dynamic-shape engines (the instance engine) bind per call, with
    output shapes read from the context after ``set_input_shape``; ``cuda_graph`` is ignored there.
    """

    #: one execution context and (static engines) one set of bound buffers: callers take turns
    thread_safe = False

    def __init__(self, plan_path: str | Path, plugin_library: str | Path | None = None,
                 device: int = 0, cuda_graph: bool = False, version_compatible: bool = False) -> None:
        """``version_compatible``: the plan was built with ``VERSION_COMPATIBLE`` (manifest ``engine``
        block), so it carries TensorRT's lean runtime as host code that the runtime must be allowed to run
        (trust the bundle: its files are sha256-checked against the manifest)."""
        from sepsnet.export.trt_build import load_plugin_library

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines need an NVIDIA GPU, and torch sees none")
        if plugin_library:
            load_plugin_library(trt, plugin_library)
        path = Path(plan_path)
        if not path.is_file():
            raise EngineError(f"TensorRT plan not found: {path}")
        self.trt = trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")  # ROIAlign_TRT and friends
        self.runtime = trt.Runtime(self.logger)
        if version_compatible:
            self.runtime.engine_host_code_allowed = True
        with torch.cuda.device(self.device):  # TensorRT works on the current CUDA device
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
        self._buffers: dict[str, torch.Tensor] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._stream = torch.cuda.Stream(self.device)
        static = self._all_static()
        self.cuda_graph = bool(cuda_graph and static)
        if static:
            self._bind_static()

    def _spec(self, name: str) -> TensorSpec:
        shape = tuple(int(d) if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(name))
        dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
        return TensorSpec(name, shape, str(dtype).replace("torch.", ""))

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [self._spec(n) for n in self._inputs]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [self._spec(n) for n in self._outputs]

    def _all_static(self) -> bool:
        return all(d >= 0 for n in self._inputs + self._outputs for d in self.engine.get_tensor_shape(n))

    def _dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def _bind_static(self) -> None:
        """Allocate every I/O tensor once (static engines) and point the context at them."""
        self._buffers = {}
        for name in self._inputs + self._outputs:
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self._dtype(name), device=self.device)
            self._buffers[name] = buf
            if name in self._inputs and not self.context.set_input_shape(name, shape):
                raise EngineError(f"{self.path.name}: cannot set input {name!r} to its static shape {shape}")
            self.context.set_tensor_address(name, buf.data_ptr())

    def _check_feeds(self, feeds: dict[str, torch.Tensor]) -> None:
        for name in self._inputs:
            if name not in feeds:
                raise EngineError(f"{self.path.name}: missing input {name!r}")
            if self._buffers is not None and tuple(feeds[name].shape) != tuple(self._buffers[name].shape):
                raise EngineError(f"{self.path.name}: input {name!r} has shape {tuple(feeds[name].shape)}, the "
                                  f"engine was built for {tuple(self._buffers[name].shape)}")

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.path.name}: execute_async_v3 failed")

    def _capture(self) -> None:
        """Record one ``execute_async_v3`` into a CUDA graph (static shapes only). TensorRT needs
        one plain enqueue first so deferred shape work is not captured. A failed capture (e.g. a
        plugin that synchronises) falls back to plain enqueues with a warning."""
        self._enqueue(self._stream)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._enqueue(self._stream)
        except Exception as exc:
            warnings.warn(f"{self.path.name}: CUDA graph capture failed ({exc}); running without it",
                          RuntimeWarning, stacklevel=3)
            self.cuda_graph = False
            return
        self._graph = graph

    def _run_static(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # inputs produced on the caller's stream are ready
        with torch.cuda.stream(self._stream):
            for name in self._inputs:
                self._buffers[name].copy_(feeds[name], non_blocking=True)
            if self.cuda_graph and self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
            else:
                self._enqueue(self._stream)
            # copies, because the next frame overwrites the static buffers
            outputs = {n: b.float() if b.dtype == torch.float16 else b.clone()
                       for n, b in ((n, self._buffers[n]) for n in self._outputs)}
        caller.wait_stream(self._stream)
        for t in outputs.values():
            t.record_stream(caller)
        return outputs

    def _run_dynamic(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []  # converted inputs must outlive the enqueue (TensorRT holds raw addresses)
        for name in self._inputs:
            t = feeds[name].to(self.device, self._dtype(name)).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"{self.path.name}: input {name!r} shape {tuple(t.shape)} is outside the "
                                  "engine's optimisation profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtype(name), device=self.device)
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        # a dedicated stream (the default/legacy stream would add implicit device syncs), ordered after the
        # caller's stream that produced the inputs, and the caller's stream after it for the outputs
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            self._enqueue(self._stream)
            result = {k: v.float() if v.dtype == torch.float16 else v for k, v in outputs.items()}
        caller.wait_stream(self._stream)
        for t in list(outputs.values()) + keep:
            t.record_stream(self._stream)  # made on the caller's stream, used on ours
        for t in result.values():
            t.record_stream(caller)  # fp32 copies made on ours, used on the caller's
        return result

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named tensors (any device/dtype) -> named CUDA tensors (fp16 outputs as fp32)."""
        self._check_feeds(feeds)
        if self._buffers is not None:
            return self._run_static(feeds)
        return self._run_dynamic(feeds)
