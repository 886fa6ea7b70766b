"""ONNX Runtime backend: CUDA execution provider when available (IO binding on torch CUDA
tensors, no host copies), else CPU. One session per graph, created once."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sepsnet.engines.backend import TensorSpec
from sepsnet.engines.device import resolve_device
from sepsnet.errors import EngineError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32}


def ortvalue_to_torch(value: object) -> torch.Tensor:
    """An OrtValue (IOBinding output) as a torch tensor on the same device, without a copy.

    onnxruntime >= 1.2x's ``OrtValue`` implements the DLPack protocol (``__dlpack__``); older
    wrappers only had ``to_dlpack()``. The DLPack capsule keeps ORT's buffer alive. Falls back
    to a host copy (``.numpy()``) only when neither is available.
    """
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    if hasattr(value, "to_dlpack"):
        return torch.from_dlpack(value.to_dlpack())
    return torch.from_numpy(np.ascontiguousarray(value.numpy()))


class OrtBackend:
    #: ``InferenceSession.run`` may be called from several threads at once (ONNX Runtime's API contract)
    thread_safe = True

    def __init__(self, onnx_path: str | Path, device: str | int | torch.device = "auto",
                 threads: int | None = None, spinning: bool = False, cpu_rewrites: bool = True) -> None:
        """``device``: ``auto`` (CUDA when onnxruntime has the CUDA provider and a GPU is visible, else
        CPU), ``cpu``, ``cuda`` or ``cuda:N`` (the GPU of the CUDA provider's ``device_id``).
        ``threads``: intra-op threads (ONNX Runtime's default: one per core). ``spinning``: let the
        intra-op threads busy-wait for work (ONNX Runtime's default). Off by default: a spinning
        worker keeps a core busy after ``run`` returns, so the torch post-processing that follows
        on a small CPU runs on one core less (issue 13: benchmarks/predictor_overhead.py).
        ``cpu_rewrites``: on the CPU provider, load the graph in the equivalent CPU-friendly form of
        :mod:`sepsnet.engines.ort_graph` (``self.rewrites`` counts them; the file is not changed)."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise EngineError(f"onnxruntime is not installed: {exc}") from None
        path = Path(onnx_path)
        if not path.is_file():
            raise EngineError(f"ONNX graph not found: {path}")
        available = ort.get_available_providers()
        auto = isinstance(device, str) and device.strip().lower() == "auto"
        has_cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
        if auto:
            target = torch.device("cuda", 0) if has_cuda else torch.device("cpu")
        else:
            if not has_cuda and str(device).strip().lower().startswith("cuda"):
                raise EngineError(f"device={device!r} asked, but onnxruntime has no CUDAExecutionProvider or no GPU "
                                  f"is visible (providers: {available}); install the `gpu` extra (onnxruntime-gpu)")
            target = resolve_device(device)
        use_cuda = target.type == "cuda"
        providers: list = ([("CUDAExecutionProvider", {"device_id": int(target.index or 0)}), "CPUExecutionProvider"]
                           if use_cuda else ["CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        #: rewrites made before loading (sepsnet.engines.ort_graph), per kind
        self.rewrites: dict[str, int] = {}
        try:
            source: str | bytes = str(path)
            if cpu_rewrites and not use_cuda:
                from sepsnet.engines.ort_graph import cpu_graph

                rewritten, self.rewrites = cpu_graph(path)
                source = rewritten if rewritten is not None else source
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {path}: {exc}") from None
        self.device = target
        self.name = f"onnxruntime-{'cuda' if use_cuda else 'cpu'}"
        self.path = path
        self.spinning = spinning

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec(i.name, tuple(i.shape), i.type.replace("tensor(", "").rstrip(")"))
                for i in self.session.get_inputs()]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec(o.name, tuple(o.shape), o.type.replace("tensor(", "").rstrip(")"))
                for o in self.session.get_outputs()]

    def _feeds_in_order(self, feeds: dict[str, torch.Tensor]) -> list[tuple[object, torch.Tensor]]:
        """(input spec, tensor) for every graph input; EngineError naming what is missing."""
        specs = self.session.get_inputs()
        missing = [s.name for s in specs if s.name not in feeds]
        if missing:
            raise EngineError(f"{self.path.name}: missing input(s) {', '.join(map(repr, missing))}; the graph "
                              f"expects {[s.name for s in specs]}, got {sorted(feeds)}")
        return [(s, feeds[s.name]) for s in specs]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [o.name for o in self.session.get_outputs()]
        if self.device.type == "cuda":
            return self._run_bound(feeds, names)
        inputs = {spec.name: t.detach().cpu().numpy().astype(_NP.get(spec.type, np.float32), copy=False)
                  for spec, t in self._feeds_in_order(feeds)}
        out = self.session.run(names, inputs)
        return {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in zip(names, out)}

    def _run_bound(self, feeds: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """IO binding on torch tensors of ``self.device`` (CUDA in practice; CPU works the same and
        is how the tests exercise this path). Outputs come back through DLPack, no host copy."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []  # bound inputs must outlive the run (ORT holds raw pointers)
        for spec, t in self._feeds_in_order(feeds):
            t = t.detach().to(self.device, _TORCH.get(spec.type, torch.float32)).contiguous()
            keep.append(t)
            binding.bind_input(spec.name, kind, index, _NP.get(spec.type, np.float32), tuple(t.shape), t.data_ptr())
        for n in names:
            binding.bind_output(n, kind, index)
        if kind == "cuda":
            # the inputs were written on the torch stream; ORT's CUDA EP runs on its own stream
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # ORT synchronises its stream before returning
        return {n: ortvalue_to_torch(o) for n, o in zip(names, binding.get_outputs())}
